"""Schema checks of the deployment files with well-kept validators (run by tests/validate_deploy.sh):
deploy/k8s/*.yaml against the Kubernetes API schemas (kubernetes-validate, strict: unknown fields fail) and
docker/compose.yaml against the Compose specification (check-jsonschema's vendored compose-spec schema).
"""
import pathlib
import subprocess
import sys

import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
K8S_VERSION = "1.33.0"


def main() -> int:
    failures = 0
    for path in sorted((ROOT / "deploy/k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
                print(f"ok   {path.relative_to(ROOT)}: {doc['kind']}/{doc['metadata']['name']}")
            except kubernetes_validate.ValidationError as e:
                failures += 1
                print(f"FAIL {path.relative_to(ROOT)}: {doc.get('kind')}: {e}")
    compose = ROOT / "docker/compose.yaml"
    r = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                        str(compose)], capture_output=True, text=True)
    print(("ok   " if r.returncode == 0 else "FAIL ") + f"{compose.relative_to(ROOT)}: {r.stdout.strip()} {r.stderr.strip()}")
    failures += r.returncode != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
