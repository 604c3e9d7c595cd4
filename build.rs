// Link flags for the shared library: a deliberate soname (ABI major version)
// and a version script so only `flatshard_*` symbols are exported.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.contains("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libflatshard.so.0");
        println!("cargo:rustc-cdylib-link-arg=-Wl,--version-script={dir}/flatshard.map");
    }
    // Programs linked against target/<profile>/libflatshard.so record the
    // soname; give them libflatshard.so.0 beside it (a link to the build).
    if let Ok(out) = std::env::var("OUT_DIR") {
        let profile_dir = std::path::Path::new(&out).ancestors().nth(3).map(|p| p.to_path_buf());
        if let Some(dir) = profile_dir {
            for d in [dir.clone(), dir.join("deps")] {
                let link = d.join("libflatshard.so.0");
                if std::fs::symlink_metadata(&link).is_err() {
                    #[cfg(unix)]
                    let _ = std::os::unix::fs::symlink("libflatshard.so", &link);
                }
            }
        }
    }
    println!("cargo:rerun-if-changed=flatshard.map");
    println!("cargo:rerun-if-changed=build.rs");
}
