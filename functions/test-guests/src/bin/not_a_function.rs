//! A valid wasm32-wasip2 component that exports `wasi:cli/run` instead of
//! the edgefn function world: the gateway must reject it with a clear error.

fn main() {
    println!("I am a command, not an edgefn function.");
}
