// Link flags for the shared library: a deliberate soname (ABI major version)
// and a version script so only `flatshard_*` symbols are exported.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.contains("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libflatshard.so.0");
        println!("cargo:rustc-cdylib-link-arg=-Wl,--version-script={dir}/flatshard.map");
    }
    println!("cargo:rerun-if-changed=flatshard.map");
    println!("cargo:rerun-if-changed=build.rs");
}
