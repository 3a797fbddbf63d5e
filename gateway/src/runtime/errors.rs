//! Why a function could not be loaded, and why the engine could not start.

use std::path::PathBuf;

use super::WORLD;

/// Why a function could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file is missing or unreadable.
    #[error("function `{function}`: cannot read `{path}`: {reason}")]
    Read {
        /// Function name.
        function: String,
        /// Component path.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// The file is not a valid WebAssembly component.
    #[error("function `{function}`: `{path}` is not a valid WebAssembly component: {reason}")]
    NotAComponent {
        /// Function name.
        function: String,
        /// Component path.
        path: PathBuf,
        /// What wasmtime said.
        reason: String,
    },
    /// A precompiled `.cwasm` that this engine cannot run.
    #[error(
        "function `{function}`: `{path}` is a precompiled component this gateway cannot load: {reason}"
    )]
    Precompiled {
        /// Function name.
        function: String,
        /// Component path.
        path: PathBuf,
        /// Why (built for another target or another engine configuration).
        reason: String,
    },
    /// A portable `.wasm` given to the runtime-only build, which has no
    /// compiler.
    #[error(
        "function `{function}`: `{path}` is not precompiled, and this gateway is the runtime-only build (no compiler): precompile it with a full build, `edgefn compile --config FILE --target {target} --out-dir DIR`, and name the `.cwasm` in `component`"
    )]
    NotPrecompiled {
        /// Function name.
        function: String,
        /// Component path.
        path: PathBuf,
        /// The `--target` to precompile for (this machine's).
        target: String,
    },
    /// The component could not be instantiated (a start function trapped,
    /// or no pool slot was free).
    #[error("function `{function}`: `{path}` could not be instantiated: {reason}")]
    Instantiate {
        /// Function name.
        function: String,
        /// Component path.
        path: PathBuf,
        /// What wasmtime said.
        reason: String,
    },
    /// The component is valid but does not implement the function world.
    #[error("function `{function}`: `{path}` does not implement the `{WORLD}` world: {reason}")]
    WrongWorld {
        /// Function name.
        function: String,
        /// Component path.
        path: PathBuf,
        /// What is missing or mismatched.
        reason: String,
    },
}

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot create the WebAssembly engine: {0}")]
pub struct EngineError(pub(crate) String);
