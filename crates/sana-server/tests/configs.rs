//! Every preset in `configs/` loads as `sana serve` settings and passes start-up validation.

use std::path::PathBuf;

use sana_server::config::{args_from_env_file, read_env_file};
use sana_server::ServerConfig;

fn configs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs")
}

#[test]
fn every_preset_is_a_valid_server_config() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(configs())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "env"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "{files:?}");
    let readme = std::fs::read_to_string(configs().join("README.md")).unwrap();
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy();
        let args = args_from_env_file(file).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            read_env_file(file)
                .unwrap()
                .iter()
                .any(|(k, _)| k == "SANA_MODEL"),
            "{name} names its model"
        );
        assert!(
            readme.contains(&format!("`{name}`")),
            "configs/README.md lists {name}"
        );
        let model = args.model.clone();
        let config = ServerConfig::try_from(args).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(config.model, model);
        println!("{name}: {model}, devices {:?}", config.engine.devices);
    }
}

#[test]
fn an_unknown_or_malformed_setting_is_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("sana-configs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.env");
    std::fs::write(&bad, "SANA_MODEL=x/y\nSANA_MAX_BATCH_IMAGS=4\n").unwrap();
    let err = read_env_file(&bad).unwrap_err();
    assert!(
        err.contains("SANA_MAX_BATCH_IMAGS") && err.contains(":2:"),
        "{err}"
    );
    std::fs::write(&bad, "# comment\n\nSANA_MODEL\n").unwrap();
    assert!(read_env_file(&bad).unwrap_err().contains("KEY=VALUE"));
    std::fs::write(
        &bad,
        "export SANA_MODEL='a/b'\nSANA_DTYPE=\"bf16\"\nSANA_DEVICES=cuda:0,cuda:1\n",
    )
    .unwrap();
    let args = args_from_env_file(&bad).unwrap();
    assert_eq!(args.model, "a/b");
    assert_eq!(args.dtype, "bf16");
    assert_eq!(args.devices, vec!["cuda:0", "cuda:1"]);
    std::fs::write(&bad, "SANA_DTYPE=f8\n").unwrap();
    assert!(args_from_env_file(&bad).unwrap_err().contains("f8"));
    std::fs::write(&bad, "SANA_DEFAULT_STEPS=500\n").unwrap();
    let err = ServerConfig::try_from(args_from_env_file(&bad).unwrap()).unwrap_err();
    assert!(err.to_string().contains("--default-steps"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
