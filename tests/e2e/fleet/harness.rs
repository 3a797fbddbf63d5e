//! The fleet tests' harness: boards (the real binary with its own config,
//! embedded broker and admin endpoint), the cloud (Mosquitto), the keys, and
//! the CLI (`keygen`, `bundle`, `deploy`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::runtime_cli::{run_binary, wait_for_line};
use crate::support::{
    KillOnDrop, Mosquitto, Publisher, Subscriber, WAIT, edgefn_bin, free_port, guest, lit,
};

pub(super) const TOKEN: &str = "fleet-test-token-0123456789";

/// One board: its directory, ports and process.
pub(super) struct Board {
    pub(super) id: String,
    pub(super) dir: PathBuf,
    pub(super) port: u16,
    pub(super) admin: u16,
    pub(super) child: Option<KillOnDrop>,
    pub(super) lines: Option<std::sync::mpsc::Receiver<String>>,
}

impl Board {
    pub(super) fn new(root: &Path, id: &str, cloud: u16, public: &Path) -> Self {
        let dir = root.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let (port, admin) = (free_port(), free_port());
        let toml = format!(
            "[gateway]\nid = \"{id}\"\ndata_dir = \"data\"\n\n[broker]\nkind = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\n\n[[sinks]]\nkind = \"mqtt\"\nname = \"cloud\"\nurl = \"mqtt://127.0.0.1:{cloud}\"\n\n[fleet]\nsink = \"cloud\"\ntrusted_keys = [{}]\nreport_interval_s = 1\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\ntoken = \"{TOKEN}\"\n",
            lit(public)
        );
        std::fs::write(dir.join("edgefn.toml"), toml).unwrap();
        Self {
            id: id.to_owned(),
            dir,
            port,
            admin,
            child: None,
            lines: None,
        }
    }

    pub(super) fn start(&mut self) {
        let (child, lines) = run_binary(&self.dir.join("edgefn.toml"));
        self.child = Some(KillOnDrop(child));
        self.lines = Some(lines);
    }

    /// Appends `toml` to the board's configuration file.
    pub(super) fn append_config(&self, toml: &str) {
        let path = self.dir.join("edgefn.toml");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(toml);
        std::fs::write(path, text).unwrap();
    }

    pub(super) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.0.kill();
            let _ = c.0.wait();
        }
        self.lines = None;
    }

    pub(super) fn wait_log(&self, parts: &[&str]) -> String {
        wait_for_line(self.lines.as_ref().unwrap(), parts)
    }

    /// Publishes `payload` on `in/<tag>` and waits for `echo/in/<tag>`.
    pub(super) async fn echoes(&self, tag: &str) -> bool {
        let mut echo = Subscriber::connect("127.0.0.1", self.port, &["echo/#"]).await;
        let mut sensor = Publisher::connect("127.0.0.1", self.port).await;
        let topic = format!("in/{tag}");
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            sensor.publish(&topic, "x").await;
            if let Some((t, _)) = echo.next_within(Duration::from_millis(300)).await
                && t == format!("echo/{topic}")
            {
                return true;
            }
        }
        false
    }

    /// `PUT /bundle` with the token; status and body.
    pub(super) async fn put_bundle(&self, bundle: &Path, force: bool) -> (u16, serde_json::Value) {
        let url = format!(
            "http://127.0.0.1:{}/bundle{}",
            self.admin,
            if force { "?force=true" } else { "" }
        );
        let r = reqwest::Client::new()
            .put(url)
            .bearer_auth(TOKEN)
            .body(std::fs::read(bundle).unwrap())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or_default())
    }

    /// `GET path` on the admin endpoint, with the token.
    pub(super) async fn get(&self, path: &str) -> String {
        reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}{path}", self.admin))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The function names the admin endpoint lists.
    pub(super) async fn functions(&self) -> Vec<String> {
        let list: serde_json::Value = serde_json::from_str(&self.get("/functions").await).unwrap();
        let mut names: Vec<String> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    }
}

/// The cloud, the keys and the boards.
pub(super) struct Fleet {
    pub(super) cloud: Mosquitto,
    pub(super) root: tempfile::TempDir,
    pub(super) key: PathBuf,
    pub(super) boards: Vec<Board>,
}

impl Fleet {
    pub(super) fn new(ids: &[&str]) -> Option<Self> {
        let cloud = Mosquitto::start()?;
        let root = tempfile::tempdir().unwrap();
        let keys = root.path().join("keys");
        cli(&["keygen", "--out", keys.to_str().unwrap()]).success();
        let boards = ids
            .iter()
            .map(|id| Board::new(root.path(), id, cloud.port, &keys.join("edgefn.pub")))
            .collect();
        Some(Self {
            cloud,
            key: keys.join("edgefn.key"),
            root,
            boards,
        })
    }

    pub(super) fn via(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.cloud.port)
    }

    /// A bundle of `functions` (TOML) at `version`, signed by `key`.
    pub(super) fn bundle(&self, name: &str, version: u64, functions: &str, key: &Path) -> PathBuf {
        let toml = self.root.path().join(format!("{name}.toml"));
        std::fs::write(&toml, functions).unwrap();
        let out = self.root.path().join(format!("{name}.bundle"));
        cli(&[
            "bundle",
            "--functions",
            toml.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--version",
            &version.to_string(),
        ])
        .success();
        out
    }

    /// Runs `edgefn deploy` with `extra` arguments.
    pub(super) fn deploy(&self, bundle: &Path, gateways: &str, extra: &[&str]) -> Output {
        let mut args = vec![
            "deploy".to_owned(),
            bundle.display().to_string(),
            "--via".to_owned(),
            self.via(),
            "--key".to_owned(),
            self.key.display().to_string(),
            "--gateways".to_owned(),
            gateways.to_owned(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&refs)
    }

    /// Waits until `gateway` reports a state for which `cond` holds.
    pub(super) async fn reported(
        &self,
        gateway: &str,
        cond: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let topic = format!("edgefn/fleet/{gateway}/reported");
        let mut sub = Subscriber::connect("127.0.0.1", self.cloud.port, &[&topic]).await;
        let deadline = Instant::now() + WAIT * 2;
        let mut last = serde_json::Value::Null;
        while Instant::now() < deadline {
            if let Some((_, p)) = sub.next_within(Duration::from_millis(500)).await {
                last = serde_json::from_slice(&p).unwrap_or_default();
                if cond(&last) {
                    return last;
                }
            }
        }
        panic!("{gateway} never reported the expected state; last: {last:#}");
    }
}

/// The output of one CLI run.
pub(super) struct Output(pub(super) std::process::Output);

impl Output {
    pub(super) fn success(self) -> Self {
        assert!(
            self.0.status.success(),
            "failed: {}\n{}",
            String::from_utf8_lossy(&self.0.stdout),
            String::from_utf8_lossy(&self.0.stderr)
        );
        self
    }

    pub(super) fn text(&self) -> String {
        eprintln!(
            "--- edgefn output:\n{}{}",
            String::from_utf8_lossy(&self.0.stdout),
            String::from_utf8_lossy(&self.0.stderr)
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&self.0.stdout),
            String::from_utf8_lossy(&self.0.stderr)
        )
    }
}

pub(super) fn cli(args: &[&str]) -> Output {
    Output(Command::new(edgefn_bin()).args(args).output().unwrap())
}

/// One function `relay` on `in/#` in `misbehave` mode `mode` (`echo`
/// publishes on `echo/<topic>`, `trap` traps on every event).
pub(super) fn relay(mode: &str) -> String {
    format!(
        "[[functions]]\nname = \"relay\"\ncomponent = {}\ntriggers = [\"in/#\"]\npublish = [\"echo/#\", \"count/#\"]\nconfig = {{ mode = \"{mode}\" }}\n",
        lit(&guest("misbehave"))
    )
}

pub(super) fn version_of(r: &serde_json::Value) -> Option<u64> {
    r["bundle"]["version"].as_u64()
}
