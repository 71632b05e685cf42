//! include/rln_engine.h is what cbindgen makes of src/lib.rs today (no drift between the
//! committed header and the ABI).

use std::path::Path;

#[test]
fn committed_header_matches_the_source() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("capi/cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen parses capi/src/lib.rs");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("UTF-8 header");
    let path = dir.join("include/rln_engine.h");
    if std::env::var("RLN_UPDATE_HEADER").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &generated).expect("writing capi/include/rln_engine.h");
        eprintln!("wrote {}", path.display());
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "capi/include/rln_engine.h is out of date with capi/src/lib.rs: run \
         `RLN_UPDATE_HEADER=1 cargo test --release -p rln-engine-capi --test header` to regenerate it, and commit it"
    );
}
