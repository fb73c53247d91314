//! Links the system UCX (Debian 12: libucx-dev 1.13.1) found with `pkg-config ucx`.
//! The bindings themselves are pre-generated (src/bindings.rs, scripts/gen-ucx-bindings.sh).

fn main() {
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_LIBDIR");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_SYSROOT_DIR");
    match pkg_config::Config::new()
        .atleast_version("1.13")
        .probe("ucx")
    {
        Ok(lib) => {
            // The .pc file lists -lucp -luct -lucs -lucm; pkg-config already printed them.
            println!("cargo:version={}", lib.version);
        }
        Err(e) => panic!(
            "ucx-sys: UCX >= 1.13 not found with pkg-config ({e}). On Debian/Ubuntu: \
             apt-get install libucx-dev (scripts/install-deps.sh)"
        ),
    }
}
