//! `uniffi-bindgen`: generates the Python, Kotlin and Swift sources of roost-ffi from the
//! built library (`generate --library target/debug/libroost_ffi.so --language kotlin ...`).
//! See docs/BINDINGS.md.

fn main() {
    uniffi::uniffi_bindgen_main()
}
