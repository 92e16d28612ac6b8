//! The Sana pipelines: prompts → text embeddings → sampling → decoding → RGB8 images
//! (diffusers `SanaPipeline` and `SanaSprintPipeline`).

pub mod sampling;
