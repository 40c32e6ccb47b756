//! With the `tch` feature, bake LibTorch's library folder into the binary's run path so
//! `ember` runs without LD_LIBRARY_PATH.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if std::env::var_os("CARGO_FEATURE_TCH").is_none() {
        return;
    }
    if let Some(libtorch) = std::env::var_os("LIBTORCH") {
        let lib = std::path::Path::new(&libtorch).join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        // A GPU LibTorch references CUDA libraries that load next to the torch install at run
        // time; they need not be present where the binary is linked.
        if lib.join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--allow-shlib-undefined");
        }
    }
}
