//! The command line: `run`, `check`, `invoke`, `compile`, `passwd`,
//! `keygen`, `bundle`, `deploy`, `status`.
//!
//! This is the binary's edge: errors are `anyhow` with context, and each
//! command returns the process exit code.

mod passwd;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::config::{self, ValidConfig};
use crate::event::{Event, SourceKind};
use crate::runtime::reload::ReloadOutcome;
use crate::runtime::{Runtime, RuntimeOptions};
use crate::supervisor::{Gateway, load_functions, systemd};

/// How long the process waits for blocking threads after the gateway has
/// stopped (or its shutdown timed out).
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// `edgefn --version`: says which build this is.
const VERSION: &str = if cfg!(feature = "compiler") {
    env!("CARGO_PKG_VERSION")
} else {
    concat!(
        env!("CARGO_PKG_VERSION"),
        " (runtime-only: loads precompiled .cwasm, no compiler)"
    )
};

/// edgefn: sensor events in, sandboxed WebAssembly functions, results out.
#[derive(Debug, Parser)]
#[command(name = "edgefn", version = VERSION, about, long_about = None)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "EDGEFN_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; no colours when not a terminal. Under systemd
    /// (stderr connected to the journal) without timestamps and with a
    /// `<N>` priority prefix, so the journal records each line's level.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway until SIGTERM or Ctrl-C.
    Run {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Also run a simulated temperature sensor (for the demo) that
        /// publishes to the local broker.
        #[arg(long)]
        simulate: bool,
        /// Milliseconds between simulated readings.
        #[arg(long, default_value_t = 1000)]
        simulate_interval_ms: u64,
        /// Seconds to wait for in-flight events when stopping (overrides
        /// `gateway.shutdown_timeout_s`, default 10).
        #[arg(long)]
        shutdown_timeout_s: Option<u64>,
    },
    /// Validate the configuration and load every function; list every problem.
    Check {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run one event through one function and print what it published and
    /// forwarded (nothing is sent anywhere).
    Invoke {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The function's name.
        function: String,
        /// The event's topic.
        #[arg(long)]
        topic: String,
        /// The payload, as text.
        #[arg(
            long,
            conflicts_with = "payload_file",
            required_unless_present = "payload_file"
        )]
        payload: Option<String>,
        /// Read the payload (any bytes) from this file instead.
        #[arg(long)]
        payload_file: Option<PathBuf>,
    },
    /// Compile the configured functions ahead of time. Without `--target`:
    /// fills the gateway's compile cache in its data dir, so the next start
    /// does not compile. With `--target`: writes `<function>.cwasm` files
    /// for another machine (e.g. `aarch64-unknown-linux-gnu`, or
    /// `armv7-unknown-linux-gnueabihf` = `pulley32`, the interpreter armv7
    /// boards run), to list as `component` in that board's configuration.
    Compile {
        /// The configuration file (its functions and `[runtime]` settings).
        #[arg(long, short)]
        config: PathBuf,
        /// Target triple to compile for.
        #[arg(long, requires = "out_dir")]
        target: Option<String>,
        /// Where to write the `.cwasm` files.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Add or change a device's entry in the broker's password file
    /// (argon2id hashes; the file is created with mode 0600 if missing).
    /// Prompts twice for the password on a terminal; otherwise reads it as
    /// one line from stdin. A running gateway applies the file on SIGHUP.
    Passwd {
        /// The password file.
        file: PathBuf,
        /// The user (device) name: 1 to 64 ASCII letters, digits, `_`, `.`
        /// or `-`.
        user: String,
        /// Remove the user instead.
        #[arg(long)]
        delete: bool,
    },
    /// Write a new ed25519 key pair for signing bundles: `DIR/edgefn.key`
    /// (secret, mode 0600) and `DIR/edgefn.pub`. Never overwrites a key.
    Keygen(crate::fleet::cli_bundle::KeygenArgs),
    /// Pack a `[[functions]]` file and its components into a signed bundle.
    Bundle(crate::fleet::cli_bundle::BundleArgs),
    /// Deploy a signed bundle to gateways over the cloud broker, canary first.
    Deploy(crate::fleet::deploy::DeployArgs),
    /// Print the gateways' reported states from the cloud broker.
    Status(crate::fleet::deploy::StatusArgs),
}

/// Runs the CLI: parses arguments, sets up logging, dispatches.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match execute(cli.command, &mut std::io::stdout()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDGEFN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text if stderr_is_journal() => builder
            .event_format(Journald(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_ansi(false),
            ))
            .try_init(),
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Whether stderr goes to journald: systemd sets `$JOURNAL_STREAM` to the
/// `device:inode` of the stream it connected (see systemd.exec(5)).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| stream == format!("{}:{}", m.dev(), m.ino()))
}

/// Text lines for journald: no timestamp (the journal adds its own) and a
/// `<N>` syslog priority prefix, so `journalctl -p warning` filters by level.
struct Journald<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for Journald<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Executes one command, writing its report to `out`.
pub fn execute(command: Command, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run {
            config,
            simulate,
            simulate_interval_ms,
            shutdown_timeout_s,
        } => {
            let config = load_config(&config)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.io_threads)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let shutdown_timeout =
                shutdown_timeout_s.map_or(config.shutdown_timeout, Duration::from_secs);
            let result = rt.block_on(run(
                config,
                simulate.then(|| Duration::from_millis(simulate_interval_ms.max(10))),
                shutdown_timeout,
            ));
            // A shutdown that timed out may leave function workers (blocking
            // threads) mid-drain: exit anyway rather than wait for them.
            rt.shutdown_timeout(EXIT_GRACE);
            result
        }
        Command::Check { config } => check(&config, out),
        Command::Invoke {
            config,
            function,
            topic,
            payload,
            payload_file,
        } => {
            let payload = match (payload, payload_file) {
                (Some(p), _) => p.into_bytes(),
                (None, Some(path)) => std::fs::read(&path)
                    .with_context(|| format!("reading the payload from `{}`", path.display()))?,
                (None, None) => anyhow::bail!("give --payload or --payload-file"),
            };
            invoke(&config, &function, &topic, payload, out)
        }
        Command::Compile {
            config,
            target,
            out_dir,
        } => compile(&config, target.as_deref(), out_dir.as_deref(), out),
        Command::Passwd { file, user, delete } => passwd::passwd(&file, &user, delete, out),
        Command::Keygen(args) => crate::fleet::cli_bundle::keygen(&args, out),
        Command::Bundle(args) => crate::fleet::cli_bundle::bundle(&args, out),
        Command::Deploy(args) => crate::fleet::deploy::deploy(args, out),
        Command::Status(args) => crate::fleet::deploy::status(args, out),
    }
}

fn compile(
    path: &Path,
    target: Option<&str>,
    out_dir: Option<&Path>,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    if !cfg!(feature = "compiler") {
        anyhow::bail!("`edgefn compile`: {}", crate::runtime::cache::NO_COMPILER);
    }
    let config = load_config(path)?;
    let Some(out_dir) = out_dir else {
        // For this machine: load every function through the gateway's own
        // cache (no pool needed to compile).
        let mut opts = RuntimeOptions::for_gateway(&config);
        opts.spec.pooling = false;
        opts.cache_dir = Some(config.data_dir.join("cache"));
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating `{}`", config.data_dir.display()))?;
        let runtime = Runtime::new(&opts)?;
        let mut failed = 0;
        for spec in &config.functions {
            match runtime.load(spec, &config.gateway_id, Default::default()) {
                Ok(f) => writeln!(
                    out,
                    "{}: {} ({})",
                    spec.name,
                    if f.from_cache() { "cached" } else { "compiled" },
                    f.version()
                )?,
                Err(e) => {
                    failed += 1;
                    writeln!(out, "{}: {e}", path.display())?;
                }
            }
        }
        return Ok(if failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    };
    let mut opts = RuntimeOptions::ephemeral(config.runtime.clone());
    opts.spec.pooling = false;
    opts.epoch_interruption = true;
    let wasm_target = target.map(crate::fleet::bundle::wasm_target);
    opts.target = wasm_target.clone();
    let runtime = Runtime::new(&opts)?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("creating `{}`", out_dir.display()))?;
    let mut failed = 0;
    for spec in &config.functions {
        let result = std::fs::read(&spec.component)
            .map_err(|e| format!("cannot read `{}`: {e}", spec.component.display()))
            .and_then(|bytes| {
                crate::runtime::cache::precompile(runtime.engine(), &bytes)
                    .map_err(|e| format!("`{}`: {e}", spec.component.display()))
            });
        match result {
            Ok(code) => {
                let file = out_dir.join(format!("{}.cwasm", spec.name));
                crate::runtime::cache::write_atomically(&file, &code)
                    .with_context(|| format!("writing `{}`", file.display()))?;
                writeln!(
                    out,
                    "{}: {} ({} bytes, {})",
                    spec.name,
                    file.display(),
                    code.len(),
                    wasm_target.as_deref().unwrap_or("this machine")
                )?;
            }
            Err(e) => {
                failed += 1;
                writeln!(out, "{}: function `{}`: {e}", path.display(), spec.name)?;
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn load_config(path: &Path) -> anyhow::Result<ValidConfig> {
    Ok(config::load(path)?)
}

async fn run(
    config: ValidConfig,
    simulate: Option<Duration>,
    shutdown_timeout: Duration,
) -> anyhow::Result<ExitCode> {
    // Handlers first: a SIGTERM during start-up is a clean stop too.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let gateway = tokio::select! {
        g = Gateway::start(&config) => g.with_context(|| format!("starting the gateway from `{}`", config.path.display()))?,
        _ = term.recv() => return Ok(ExitCode::SUCCESS),
        _ = interrupt.recv() => return Ok(ExitCode::SUCCESS),
    };
    let watchdog = CancellationToken::new();
    systemd::spawn_watchdog(watchdog.clone(), gateway.progress().clone());
    systemd::ready(&format!(
        "serving {} function(s); admin {}",
        config.functions.len(),
        gateway
            .admin_addr()
            .map_or_else(|| "off".to_owned(), |a| a.to_string())
    ));
    let sim_cancel = CancellationToken::new();
    if let Some(interval) = simulate {
        let (host, port) = gateway.local_broker();
        tokio::spawn(crate::simulate::run(
            host.to_owned(),
            port,
            gateway.local_login().cloned(),
            vec!["sim-1".into(), "sim-2".into()],
            interval,
            sim_cancel.clone(),
        ));
    }
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => {
                tracing::info!(config = %config.path.display(), "SIGHUP: reloading the configuration.");
                match config::load(&config.path) {
                    Ok(new) => match gateway.reload(new).await {
                        ReloadOutcome::Applied { switched, added, removed, updated, restart_needed } => {
                            tracing::info!(switched, added = ?added, removed = ?removed, updated = ?updated, restart_pending = restart_needed.len(), "Configuration reloaded.");
                        }
                        ReloadOutcome::Refused(problems) => {
                            tracing::error!(problems = problems.len(), "Configuration reload refused; nothing was changed.");
                        }
                    },
                    Err(errors) => {
                        gateway.metrics().reloads_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::error!(problems = %errors, "The new configuration is invalid; nothing was changed.");
                    }
                }
            }
        }
    }
    tracing::info!(
        timeout_ms = shutdown_timeout.as_millis() as u64,
        "Stopping: draining in-flight events."
    );
    systemd::stopping();
    sim_cancel.cancel();
    let clean = gateway.shutdown(shutdown_timeout).await;
    watchdog.cancel();
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn check(path: &Path, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            writeln!(out, "{errors}")?;
            return Ok(ExitCode::FAILURE);
        }
    };
    // The sinks' clients and TLS settings, as at start (nothing connects).
    if let Err(e) = crate::supervisor::build_sinks(&config, crate::sinks::SinkEnv::default()) {
        writeln!(out, "{}: {e}", path.display())?;
        return Ok(ExitCode::FAILURE);
    }
    let runtime = Runtime::new(&RuntimeOptions::ephemeral(config.runtime.clone()))?;
    match load_functions(&runtime, &config) {
        Ok(functions) => {
            writeln!(
                out,
                "{}: ok ({} function{}, {} sink{})",
                path.display(),
                functions.len(),
                if functions.len() == 1 { "" } else { "s" },
                config.sinks.len(),
                if config.sinks.len() == 1 { "" } else { "s" },
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            writeln!(out, "{} function(s) could not be loaded", errors.len())?;
            for e in errors {
                writeln!(out, "  - {}: {e}", path.display())?;
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

fn invoke(
    path: &Path,
    function: &str,
    topic: &str,
    payload: Vec<u8>,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    let config = load_config(path)?;
    let Some(spec) = config.functions.iter().find(|f| f.name == function) else {
        let names: Vec<&str> = config.functions.iter().map(|f| f.name.as_str()).collect();
        anyhow::bail!(
            "{}: no function named `{function}` (configured: {})",
            path.display(),
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        );
    };
    crate::topic::validate_topic_name(topic).with_context(|| format!("--topic `{topic}`"))?;
    let runtime = Runtime::new(&RuntimeOptions::ephemeral(config.runtime.clone()))?;
    let loaded = runtime.load(spec, &config.gateway_id, Default::default())?;
    let event = Event::new(SourceKind::Manual, topic, payload);
    let invocation = loaded.invoke(&event);
    let elapsed_us = invocation.elapsed.as_micros();
    match invocation.outcome {
        Ok(outputs) => {
            for p in &outputs.publishes {
                writeln!(
                    out,
                    "publish {} qos={} {}",
                    p.topic,
                    p.qos,
                    show(&p.payload)
                )?;
            }
            for f in &outputs.forwards {
                writeln!(out, "forward {} {}", f.sink, show(&f.payload))?;
            }
            writeln!(
                out,
                "ok: {} published, {} forwarded, {elapsed_us} µs",
                outputs.publishes.len(),
                outputs.forwards.len()
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Err(failure) => {
            writeln!(out, "failed ({}): {failure}", failure.kind())?;
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Payload for humans: text as is, anything else as hex.
fn show(payload: &[u8]) -> String {
    match std::str::from_utf8(payload) {
        Ok(s) if !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') => s.to_owned(),
        _ => {
            let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
            format!("0x{hex}")
        }
    }
}
