//! Resolution binning, resize + centre crop and u8 conversion against diffusers' image processor
//! (`tools/gen_fixtures.py image`).

use crate::common;

use common::{fixtures, load};
use sana_model::image::{bin_table, classify_height_width_bin, resize_and_crop, to_rgb8};
use sana_model::weights::read_config;
use serde_json::Value;

#[test]
fn bin_tables_and_choices_equal_diffusers() {
    let v: Value = read_config(&fixtures().join("image/bins.json")).unwrap();
    for (name, sample_size) in [("512", 16), ("1024", 32), ("2048", 64), ("4096", 128)] {
        let ours = bin_table(sample_size).unwrap();
        let theirs = v["tables"][name].as_array().unwrap();
        assert_eq!(ours.len(), theirs.len(), "table {name}: entry count");
        for ((k, h, w), t) in ours.iter().zip(theirs) {
            assert_eq!(t[0].as_str().unwrap(), *k, "table {name}: key order");
            assert_eq!(
                (t[1].as_u64().unwrap(), t[2].as_u64().unwrap()),
                (*h as u64, *w as u64),
                "table {name} key {k}"
            );
        }
    }
    assert!(
        bin_table(8).is_none(),
        "a sample_size without a table does not bin"
    );
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 40);
    for c in cases {
        let table = match c["table"].as_str().unwrap() {
            "512" => bin_table(16),
            "1024" => bin_table(32),
            "2048" => bin_table(64),
            _ => bin_table(128),
        }
        .unwrap();
        let (h, w) = (
            c["height"].as_u64().unwrap() as u32,
            c["width"].as_u64().unwrap() as u32,
        );
        let want = (
            c["bin"][0].as_u64().unwrap() as u32,
            c["bin"][1].as_u64().unwrap() as u32,
        );
        assert_eq!(classify_height_width_bin(h, w, table), want, "{c}");
    }
}

#[test]
fn resize_crop_and_u8_equal_diffusers() {
    let meta: Value = read_config(&fixtures().join("image/resize.json")).unwrap();
    let t = load(&fixtures().join("image/resize.safetensors"));
    for case in meta.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (th, tw) = (
            case["target"][0].as_u64().unwrap() as usize,
            case["target"][1].as_u64().unwrap() as usize,
        );
        let out = resize_and_crop(&t[&format!("{name}_in")], th, tw).unwrap();
        common::assert_close(
            name,
            &out,
            &t[&format!("{name}_out")],
            1e-5,
            "f32 bilinear resize + crop",
        );
        let u8_ref: Vec<u8> = t[&format!("{name}_u8")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let ours = to_rgb8(&t[&format!("{name}_out")]).unwrap();
        assert_eq!(ours.len(), 1);
        assert_eq!(
            ours[0], u8_ref,
            "{name}: u8 postprocess differs from diffusers"
        );
    }
}
