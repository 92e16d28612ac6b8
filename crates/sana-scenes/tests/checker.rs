//! The pixel checker against ground-truth renders of `tools/scenes/world.py`, and against the
//! Python mirror of the checker on generated (imperfect) images.

use std::path::PathBuf;

use sana_scenes::{check, Scene, Tally};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/scenes")
}

fn images(file: &str) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(fixtures().join(file)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("images").unwrap();
    let shape = t.shape().to_vec();
    assert_eq!(&shape[1..], &[64, 64, 3]);
    t.data().chunks(64 * 64 * 3).map(<[u8]>::to_vec).collect()
}

#[test]
fn reads_ground_truth_renders_exactly() {
    let scenes: Vec<Scene> =
        serde_json::from_slice(&std::fs::read(fixtures().join("rendered.json")).unwrap()).unwrap();
    let images = images("rendered.safetensors");
    assert_eq!(scenes.len(), images.len());
    let mut tally = Tally::default();
    for (scene, img) in scenes.iter().zip(&images) {
        let found = check(img, 64, 64);
        assert_eq!(
            found.objects.len(),
            scene.objects.len(),
            "{scene:?}: {found:?}"
        );
        tally.add(scene, &found);
    }
    println!("{tally}");
    let all = Tally {
        scenes: tally.scenes,
        background: tally.scenes,
        objects: tally.objects,
        color: tally.objects,
        position: tally.objects,
        shape: tally.objects,
        size: tally.objects,
    };
    assert_eq!(tally, all);
    // Every attribute value occurs, so none is right by default.
    for key in [
        "circle", "square", "triangle", "small", "large", "left", "right", "top", "bottom",
        "centre",
    ] {
        assert!(
            serde_json::to_string(&scenes)
                .unwrap()
                .contains(&format!("\"{key}\"")),
            "no {key} in the fixture"
        );
    }
}

#[test]
fn scores_a_wrong_scene_as_wrong() {
    let scenes: Vec<Scene> =
        serde_json::from_slice(&std::fs::read(fixtures().join("rendered.json")).unwrap()).unwrap();
    let images = images("rendered.safetensors");
    // Each image against the next scene's description.
    let mut tally = Tally::default();
    for (k, img) in images.iter().enumerate() {
        tally.add(&scenes[(k + 1) % scenes.len()], &check(img, 64, 64));
    }
    println!("{tally}");
    assert!(tally.background_pct() < 50.0, "{tally}");
    assert!(
        tally.shape_pct() < 70.0 && tally.position_pct() < 70.0,
        "{tally}"
    );
    // A blank image has no objects: every object attribute misses.
    let blank: Vec<u8> = [30u8, 60, 220].repeat(64 * 64);
    let found = check(&blank, 64, 64);
    assert_eq!(found.background, "blue");
    assert!(found.objects.is_empty());
    let mut t = Tally::default();
    t.add(&scenes[0], &found);
    assert_eq!((t.color, t.position, t.shape, t.size), (0, 0, 0, 0));
}

#[test]
fn agrees_with_the_python_checker_on_generated_images() {
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("diffusers.json")).unwrap()).unwrap();
    for (img, expected) in images("diffusers.safetensors")
        .iter()
        .zip(reference["found"].as_array().unwrap())
    {
        let found = serde_json::to_value(check(img, 64, 64)).unwrap();
        assert_eq!(&found, expected);
    }
}
