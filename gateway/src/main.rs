//! The `edgefn` binary: a thin wrapper over [`edgefn::cli`].

fn main() -> std::process::ExitCode {
    edgefn::cli::main()
}
