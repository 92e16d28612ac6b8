//! Prints the OpenAPI document: `cargo run -p sana-server --example openapi > openapi.yaml`.

fn main() {
    print!("{}", sana_server::openapi::yaml());
}
