//! roost-tests: end-to-end tests of the whole system. The tests live in `tests/`: the
//! federation scenario suite of roost-interop run as tests (`federation.rs`, one test per
//! scenario) and the harness's own process control (`harness.rs`), each against real `roost`
//! processes on 127.0.0.1. This library is empty.
#![forbid(unsafe_code)]
