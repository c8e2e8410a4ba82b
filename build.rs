//! Links OpenBLAS statically for the `openblas` feature: searches `OPENBLAS_LIB_DIR`, then
//! the usual library directories (Debian's multiarch ones first) for `libopenblas.a`.

fn main() {
    println!("cargo:rerun-if-env-changed=OPENBLAS_LIB_DIR");
    if std::env::var_os("CARGO_FEATURE_OPENBLAS").is_none() {
        return;
    }
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let mut dirs: Vec<String> = std::env::var("OPENBLAS_LIB_DIR").into_iter().collect();
    dirs.extend([
        format!("/usr/lib/{arch}-linux-gnu"),
        format!("/usr/lib/{arch}-linux-gnu/openblas-pthread"),
        "/usr/lib64".into(),
        "/usr/lib".into(),
        "/usr/local/lib".into(),
    ]);
    let Some(dir) = dirs
        .iter()
        .find(|d| std::path::Path::new(d).join("libopenblas.a").exists())
    else {
        panic!(
            "the `openblas` feature needs libopenblas.a (Debian: apt-get install libopenblas-dev, \
             which scripts/setup-system does; or set OPENBLAS_LIB_DIR), or build with \
             --no-default-features; searched {dirs:?}"
        );
    };
    println!("cargo:rustc-link-search=native={dir}");
    println!("cargo:rustc-link-lib=static=openblas");
    // OpenBLAS's own threads and its Fortran-compiled parts.
    println!("cargo:rustc-link-lib=dylib=pthread");
    println!("cargo:rustc-link-lib=dylib=m");
}
