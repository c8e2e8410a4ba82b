//! With `cuda`, compiles src/model/kernels/*.cu to PTX with nvcc and embeds a run-time search path for the CUDA libraries (below).
//! Links OpenBLAS statically for the `openblas` feature: searches `OPENBLAS_LIB_DIR`, then
//! the usual library directories (Debian's multiarch ones first) for `libopenblas.a`.

fn main() {
    println!("cargo:rerun-if-env-changed=OPENBLAS_LIB_DIR");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        cuda_library_search_path();
        cuda_kernels();
    }
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

/// A binary built with `cuda` links libcudart, libcublas(Lt) and libcurand dynamically, and the
/// loader resolves them before `main` runs. The embedded search path tries, in order: a
/// `cuda-libs/` folder beside the binary (where `scripts/gpu-check` links the libraries it finds
/// in a PyTorch install), the system toolkit, and the PyPI wheel layout of common Python
/// installs. `LD_LIBRARY_PATH` still comes first when set (the path is a RUNPATH).
fn cuda_library_search_path() {
    let mut dirs = vec![
        "$ORIGIN/cuda-libs".to_string(),
        "$ORIGIN/../lib".to_string(),
        "/usr/local/cuda/lib64".to_string(),
        "/usr/local/cuda-13/lib64".to_string(),
        "/usr/local/cuda/targets/x86_64-linux/lib".to_string(),
    ];
    for python in ["3.14", "3.13", "3.12", "3.11", "3.10"] {
        for prefix in ["/opt/torch/.venv/lib", "/usr/local/lib", "/usr/lib"] {
            for site in ["site-packages", "dist-packages"] {
                dirs.push(format!("{prefix}/python{python}/{site}/nvidia/cu13/lib"));
            }
        }
    }
    println!(
        "cargo:rustc-link-arg=-Wl,--enable-new-dtags,-rpath,{}",
        dirs.join(":")
    );
}

/// `src/model/kernels/corpusdb.cu` to `$OUT_DIR/corpusdb.ptx` with nvcc (from `CUDA_HOME`,
/// `CUDA_PATH` or `PATH`), for `compute_$CUDA_COMPUTE_CAP` (default 80: A100 and newer; the
/// driver compiles the PTX for the GPU it runs on).
fn cuda_kernels() {
    let source = "src/model/kernels/corpusdb.cu";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|home| std::path::PathBuf::from(home).join("bin/nvcc"))
        .find(|p| p.exists())
        .unwrap_or_else(|| "nvcc".into());
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("corpusdb.ptx");
    let status = std::process::Command::new(&nvcc)
        .args([
            "--ptx",
            "-O3",
            &format!("-arch=compute_{cap}"),
            source,
            "-o",
        ])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "the `cuda` feature needs nvcc ({}): {e}; set CUDA_HOME",
                nvcc.display()
            )
        });
    assert!(status.success(), "nvcc failed on {source}");
}
