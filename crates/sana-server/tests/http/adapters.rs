//! LoRA and PAG through the API: the fields reach the batch, bad values are 400s naming the field,
//! `GET /v1/models` lists the adapters, and the served OpenAPI document describes them.

use axum::http::StatusCode;
use sana_engine::sana_backend::{LayerSet, LoraChoice, LoraInfo, ModelInfo};
use sana_engine::testing::FakeBackend;
use serde_json::json;

use crate::common::{call, generate, get, model_info, served, server_with};

fn info_with_loras() -> ModelInfo {
    let lora = |name: &str| LoraInfo {
        name: name.into(),
        source: format!("/adapters/{name}"),
        modules: 32,
        ranks: vec![4],
    };
    ModelInfo {
        loras: vec![lora("style"), lora("subject")],
        ..model_info()
    }
}

#[tokio::test]
async fn lora_and_pag_fields_reach_the_batch() {
    let server = server_with(&[], FakeBackend::new().with_info(info_with_loras())).await;
    let answer = generate(
        &server.app,
        json!({"prompt": "a", "size": "64x64", "lora": [{"name": "style", "scale": 0.5}, {"name": "subject"}],
               "pag_scale": 2.0, "pag_adaptive_scale": 0.01, "pag_applied_layers": ["transformer_blocks.8", 3]}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.json());
    let batch = served(&server.log).pop().expect("a batch");
    let item = &batch.items[0];
    assert_eq!(
        item.lora,
        vec![
            LoraChoice {
                name: "style".into(),
                scale: 0.5
            },
            LoraChoice {
                name: "subject".into(),
                scale: 1.0
            }
        ]
    );
    assert_eq!((item.pag_scale, item.pag_adaptive_scale), (2.0, 0.01));
    assert_eq!(
        batch.key.pag_layers,
        Some(LayerSet::from_indices([3, 8]).unwrap())
    );
    // Without PAG the key has no layers, whatever layers are named.
    let answer = generate(
        &server.app,
        json!({"prompt": "a", "size": "64x64", "pag_applied_layers": "transformer_blocks.2"}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let batch = served(&server.log).pop().expect("a batch");
    assert_eq!(batch.key.pag_layers, None);
    assert!(batch.items[0].lora.is_empty());
}

#[tokio::test]
async fn bad_lora_and_pag_values_are_400s_naming_the_field() {
    let server = server_with(&[], FakeBackend::new().with_info(info_with_loras())).await;
    let cases = [
        (
            json!({"lora": [{"name": "nope"}]}),
            "lora",
            vec!["`nope`", "style, subject"],
        ),
        (
            json!({"lora": [{"name": "style"}, {"name": "style", "scale": 2}]}),
            "lora",
            vec!["twice"],
        ),
        (
            json!({"lora": [{"name": "style", "scale": 1e39}]}),
            "lora",
            vec!["finite"],
        ),
        (
            json!({"lora": [{"name": "style", "scale": 101}]}),
            "lora",
            vec!["100"],
        ),
        (json!({"pag_scale": -1}), "pag_scale", vec!["[0, 100]"]),
        (json!({"pag_scale": 1e39}), "pag_scale", vec!["[0, 100]"]),
        (
            json!({"pag_adaptive_scale": -0.5}),
            "pag_adaptive_scale",
            vec!["[0, 100]"],
        ),
        (
            json!({"pag_scale": 1, "pag_applied_layers": "transformer_blocks.40"}),
            "pag_applied_layers",
            vec!["transformer_blocks.40", "20 blocks"],
        ),
        (
            json!({"pag_scale": 1, "pag_applied_layers": 20}),
            "pag_applied_layers",
            vec!["`20`"],
        ),
        (
            json!({"pag_scale": 1, "pag_applied_layers": "("}),
            "pag_applied_layers",
            vec!["regular expression"],
        ),
        (
            json!({"pag_scale": 1, "pag_applied_layers": []}),
            "pag_applied_layers",
            vec!["empty"],
        ),
        (
            json!({"pag_scale": 1, "pag_applied_layers": [1.0, 7.0, 40]}),
            "pag_applied_layers",
            vec!["`40`"],
        ),
    ];
    for (extra, param, words) in cases {
        let mut body = json!({"prompt": "a", "size": "64x64"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let answer = generate(&server.app, body.clone()).await;
        let err = answer.expect_error(StatusCode::BAD_REQUEST, "validation", Some(param));
        for word in words {
            assert!(
                err.message.contains(word),
                "{body}: {:?} lacks {word:?}",
                err.message
            );
        }
    }
    assert!(
        served(&server.log).is_empty(),
        "no bad request reached the model"
    );
    // Whole numbers written as floats are indices (a JSON encoder may write 1 as 1.0).
    let answer = generate(
        &server.app,
        json!({"prompt": "a", "size": "64x64", "pag_scale": 1, "pag_applied_layers": [1.0, 7.0, 3]}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.json());
    assert_eq!(
        served(&server.log).pop().unwrap().key.pag_layers,
        Some(LayerSet::from_indices([1, 3, 7]).unwrap())
    );
    // Wrong shapes are type errors naming the field.
    for body in [
        json!({"prompt": "a", "pag_applied_layers": 1.5}),
        json!({"prompt": "a", "pag_applied_layers": -1}),
        json!({"prompt": "a", "pag_applied_layers": [true]}),
        json!({"prompt": "a", "lora": "style"}),
        json!({"prompt": "a", "lora": [{"name": "style", "weight": 1}]}),
        json!({"prompt": "a", "pag_applied_layers": {"x": 1}}),
    ] {
        let answer = generate(&server.app, body.clone()).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
    }
}

#[tokio::test]
async fn adapters_are_refused_when_none_is_loaded_and_pag_on_sprint() {
    let sprint = ModelInfo {
        pag_supported: false,
        ..model_info()
    };
    let server = server_with(&[], FakeBackend::new().with_info(sprint)).await;
    let answer = generate(
        &server.app,
        json!({"prompt": "a", "lora": [{"name": "style"}]}),
    )
    .await;
    let err = answer.expect_error(StatusCode::BAD_REQUEST, "validation", Some("lora"));
    assert!(err.message.contains("--lora"), "{}", err.message);
    let answer = generate(&server.app, json!({"prompt": "a", "pag_scale": 2})).await;
    let err = answer.expect_error(StatusCode::BAD_REQUEST, "validation", Some("pag_scale"));
    assert!(err.message.contains("Sprint"), "{}", err.message);
    // PAG at 0 is no PAG, and fine.
    let answer = generate(
        &server.app,
        json!({"prompt": "a", "size": "64x64", "pag_scale": 0}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test]
async fn models_list_the_adapters_and_the_served_document_describes_them() {
    let server = server_with(&[], FakeBackend::new().with_info(info_with_loras())).await;
    let models = call(&server.app, get("/v1/models")).await.json();
    let adapters = &models["data"][0]["lora_adapters"];
    assert_eq!(adapters[0]["name"], "style");
    assert_eq!(adapters[1]["name"], "subject");
    assert_eq!(adapters[0]["ranks"], json!([4]));
    let doc = call(&server.app, get("/openapi.json")).await.json();
    let props = &doc["components"]["schemas"]["CreateImageRequest"]["properties"];
    assert_eq!(
        props["lora"]["items"]["properties"]["name"]["enum"],
        json!(["style", "subject"])
    );
    assert_eq!(
        props["pag_applied_layers"]["oneOf"][1]["oneOf"][0]["maximum"],
        json!(19)
    );
    // None loaded: the document allows no adapter.
    let plain = server_with(&[], FakeBackend::new().with_info(model_info())).await;
    let doc = call(&plain.app, get("/openapi.json")).await.json();
    let props = &doc["components"]["schemas"]["CreateImageRequest"]["properties"];
    assert_eq!(props["lora"]["maxItems"], json!(0));
    let models = call(&plain.app, get("/v1/models")).await.json();
    assert_eq!(models["data"][0]["lora_adapters"], json!([]));
}
