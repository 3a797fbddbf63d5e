//! The command line: `check` and `invoke` on the demo, and every kind of
//! broken configuration or component reported with its place.

use std::process::ExitCode;

use edgefn::cli::{Command, execute};
use edgefn::supervisor::{Gateway, StartError};

use crate::support::*;

fn demo() -> std::path::PathBuf {
    root().join("examples/demo.toml")
}

fn run(command: Command) -> (ExitCode, String) {
    let mut out = Vec::new();
    let code = execute(command, &mut out).unwrap();
    (code, String::from_utf8(out).unwrap())
}

#[test]
fn check_accepts_the_demo() {
    guest("threshold");
    let (code, out) = run(Command::Check { config: demo() });
    assert_eq!(code, ExitCode::SUCCESS, "{out}");
    assert!(out.contains("ok (4 functions, 1 sink)"), "{out}");
}

#[test]
fn invoke_prints_what_the_function_published_and_forwarded() {
    guest("threshold");
    let invoke = |function: &str, payload: &str| Command::Invoke {
        config: demo(),
        function: function.into(),
        topic: "sensors/s1/temperature".into(),
        payload: Some(payload.into()),
        payload_file: None,
    };
    let (code, out) = run(invoke("threshold", r#"{"value": 31.5}"#));
    assert_eq!(code, ExitCode::SUCCESS, "{out}");
    assert!(
        out.contains("publish alerts/s1/temperature qos=1 {"),
        "{out}"
    );
    assert!(out.contains("\"value\":31.5"), "{out}");
    assert!(out.contains("ok: 1 published, 0 forwarded"), "{out}");

    let (code, out) = run(invoke("enrich", r#"{"value": 20}"#));
    assert_eq!(code, ExitCode::SUCCESS, "{out}");
    assert!(out.contains("forward cloud {"), "{out}");
    assert!(out.contains("\"fahrenheit\":68.0"), "{out}");

    let (code, out) = run(invoke("threshold", "nonsense"));
    assert_eq!(code, ExitCode::FAILURE);
    assert!(out.contains("failed (error)"), "{out}");
    assert!(out.contains("not the expected JSON"), "{out}");

    let mut sink = Vec::new();
    let err = execute(invoke("nope", "{}"), &mut sink).unwrap_err();
    assert!(format!("{err:#}").contains(
        "no function named `nope` (configured: threshold, enrich, moving-average, cbor-decode)"
    ));
}

#[test]
fn check_reports_every_broken_component_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"definitely not wasm").unwrap();
    let missing = dir.path().join("missing.wasm");
    let config = dir.path().join("edgefn.toml");
    let function = |name: &str, path: &std::path::Path| {
        format!(
            "[[functions]]\nname = \"{name}\"\ncomponent = {}\ntriggers = [\"t/#\"]\n",
            lit(path)
        )
    };
    std::fs::write(
        &config,
        format!(
            "[gateway]\nid = \"gw\"\n{}{}{}{}{}",
            function("good", &guest("threshold")),
            function("missing", &missing),
            function("core", &core),
            function("garbage", &garbage),
            function("command", &guest("not-a-function")),
        ),
    )
    .unwrap();
    let (code, out) = run(Command::Check {
        config: config.clone(),
    });
    assert_eq!(code, ExitCode::FAILURE);
    assert!(out.contains("4 function(s) could not be loaded"), "{out}");
    assert!(out.contains("function `missing`: cannot read"), "{out}");
    assert!(
        out.contains("function `core`:") && out.contains("is a core WebAssembly module"),
        "{out}"
    );
    assert!(
        out.contains("function `garbage`:") && out.contains("is not a valid WebAssembly component"),
        "{out}"
    );
    assert!(
        out.contains("function `command`:")
            && out.contains("does not implement the `edgefn:function/function@0.1.2` world"),
        "{out}"
    );
    assert!(!out.contains("function `good`"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_to_start_with_a_broken_component() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("gone.wasm");
    let (config, _d) = config(&format!(
        "[gateway]\nid = \"gw\"\n[broker]\nkind = \"embedded\"\nlisten = \"127.0.0.1:0\"\n[[functions]]\nname = \"f\"\ncomponent = {}\ntriggers = [\"t\"]\n",
        lit(&missing)
    ));
    match Gateway::start(&config).await {
        Err(StartError::Functions(errors)) => {
            assert_eq!(errors.len(), 1);
            assert!(errors[0].to_string().contains("gone.wasm"), "{}", errors[0]);
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a gateway with a missing component must not start"),
    }
}

#[test]
fn check_names_the_file_and_key_of_a_bad_setting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[gateway]\nid = \"gw\"\n[[functions]]\nname = \"f\"\ncomponent = \"f.wasm\"\ntriggers = [\"a/#/b\"]\n[functions.limits]\nmemory_mib = 0\n",
    )
    .unwrap();
    let (code, out) = run(Command::Check {
        config: path.clone(),
    });
    assert_eq!(code, ExitCode::FAILURE);
    let file = path.display().to_string();
    assert!(
        out.contains(&format!("{file}: functions[0].triggers[0]: `a/#/b`")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "{file}: functions[0].limits.memory_mib: must be between"
        )),
        "{out}"
    );
    assert!(out.contains("2 problems"), "{out}");
}

/// A sink's clients are built at `check` and at start, before any task runs,
/// not at its first delivery: an HTTP sink whose client certificate does not
/// belong to its key is refused by both, naming the sink and the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_whose_tls_cannot_be_set_up_fails_check_and_start() {
    let pki = crate::tls::make_pki();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("device.pem");
    let key = dir.path().join("other.key");
    std::fs::write(&cert, &pki.client.0).unwrap();
    std::fs::write(&key, &pki.server.1).unwrap();
    let (config, _d) = config(&format!(
        "[gateway]\nid = \"gw\"\n[broker]\nkind = \"embedded\"\nlisten = \"127.0.0.1:0\"\n[[sinks]]\nkind = \"http\"\nname = \"ingest\"\nurl = \"https://127.0.0.1:9/ingest\"\n[sinks.tls]\ncert = {}\nkey = {}\n",
        lit(&cert),
        lit(&key)
    ));
    let (code, out) = run(Command::Check {
        config: config.path.clone(),
    });
    assert_eq!(code, ExitCode::FAILURE, "{out}");
    assert!(out.contains("sinks.ingest: tls: "), "{out}");
    match Gateway::start(&config).await {
        Err(StartError::Sink(e)) => assert!(e.to_string().contains("sinks.ingest"), "{e}"),
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a gateway whose sink cannot be built must not start"),
    }
}
