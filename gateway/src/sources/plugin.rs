//! The plug-in point of `[[sources]]`: what a source kind provides
//! ([`SourcePlugin`]) and the macro that turns the one-line list of kinds in
//! [`super`] into the `kind`-tagged enums the rest of the gateway dispatches
//! on ([`super::SourceConfig`], [`super::SourceSpec`]).

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use super::{SourceContext, SourceError, SourceStats};
use crate::config::{KeyChanges, Scope};
use crate::output::Writes;
use crate::progress::Progress;
use crate::sources::serial::config::Line;

/// A kind of `[[sources]]` entry, chosen by its `kind` key.
pub trait SourcePlugin {
    /// The value of `kind`.
    const KIND: &'static str;
    /// The table as written (without `kind`); serde with
    /// `deny_unknown_fields`.
    type Config: serde::de::DeserializeOwned + fmt::Debug + Clone;
    /// The validated settings: paths resolved, values in range.
    type Spec: fmt::Debug + Clone + PartialEq + Send + Sync + 'static;

    /// The entry's `name`, before validation.
    fn name(config: &Self::Config) -> &str;
    /// Checks the kind's own keys, reporting every problem through `scope`;
    /// `None` if any was found.
    fn validate(config: &Self::Config, scope: &mut Scope<'_, '_>) -> Option<Self::Spec>;
    /// What every source has, for the checks across entries.
    fn common(spec: &Self::Spec) -> Common<'_>;
    /// Records which of the kind's keys differ (a restart applies them).
    fn changed(a: &Self::Spec, b: &Self::Spec, keys: &mut KeyChanges);
    /// Opens devices and creates clients and timers; starts no task. The
    /// returned future reads until `ctx.cancel` fires.
    fn build(
        spec: &Self::Spec,
        env: &BuildEnv,
        ctx: &SourceContext,
    ) -> Result<BuiltSource, SourceError>;
}

/// The settings every source kind has.
#[derive(Debug, Clone, Copy)]
pub struct Common<'a> {
    /// Unique name.
    pub name: &'a str,
    /// The topic of its events; `None` for a kind that produces none (a
    /// GPIO output).
    pub topic: Option<&'a str>,
    /// The local MQTT topic its events are mirrored on, if any.
    pub mirror_topic: Option<&'a str>,
    /// Whether functions may write to it (`serial_ports`).
    pub writable: bool,
    /// The serial port it opens, if any.
    pub port: Option<Port<'a>>,
}

/// A serial port a source opens.
#[derive(Debug, Clone, Copy)]
pub struct Port<'a> {
    /// Its device path.
    pub path: &'a Path,
    /// The line settings under which entries may share it (Modbus RTU units
    /// on one bus); `None`: the entry needs the port to itself.
    pub shared: Option<Line>,
}

/// What building a source may use besides its spec.
#[derive(Clone)]
pub struct BuildEnv {
    /// The local broker, for `mirror_topic`.
    pub local: rumqttc::AsyncClient,
    /// The watchdog's registry ([`crate::progress`]).
    pub progress: Arc<Progress>,
    /// `gateway.data_dir`, for state a source keeps across restarts.
    pub data_dir: PathBuf,
}

/// A source ready to run.
pub struct BuiltSource {
    /// Its counters (admin endpoint, metrics).
    pub stats: Arc<SourceStats>,
    /// Where functions' writes to it go, for writable kinds.
    pub writes: Option<Writes>,
    /// Reads and dispatches until cancelled.
    pub run: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl BuildEnv {
    /// The watchdog's handle for the source `name`.
    pub fn beat(&self, name: &str) -> Arc<crate::progress::Beat> {
        self.progress
            .watch("source", name, crate::progress::SOURCE_LIMIT)
    }
}

impl BuiltSource {
    /// `source`, to be run with `ctx`, with its counters and (for writable
    /// kinds) its write queue.
    pub fn new<S: super::Source>(
        source: S,
        stats: Arc<SourceStats>,
        writes: Option<Writes>,
        ctx: &SourceContext,
    ) -> Self {
        Self {
            stats,
            writes,
            run: Box::pin(source.run(ctx.clone())),
        }
    }
}

/// Declares the source kinds: one `Variant(module::Plugin)` line each.
macro_rules! source_kinds {
    ($($variant:ident($plugin:ty)),+ $(,)?) => {
        /// A `[[sources]]` entry as written, by `kind`.
        #[derive(Debug, Clone)]
        #[allow(missing_docs, reason = "one variant per kind, named after it")]
        pub enum SourceConfig {
            $($variant(<$plugin as SourcePlugin>::Config),)+
        }

        /// A validated `[[sources]]` entry, by `kind`.
        #[derive(Debug, Clone, PartialEq)]
        #[allow(missing_docs, reason = "one variant per kind, named after it")]
        pub enum SourceSpec {
            $($variant(<$plugin as SourcePlugin>::Spec),)+
        }

        /// Every source `kind`, in the order of the list.
        pub const KINDS: &[&str] = &[$(<$plugin as SourcePlugin>::KIND),+];

        impl SourceConfig {
            /// The entry's `name`.
            pub fn name(&self) -> &str {
                match self { $(Self::$variant(c) => <$plugin as SourcePlugin>::name(c),)+ }
            }

            /// Validates the kind's own keys.
            pub fn validate(&self, scope: &mut crate::config::Scope<'_, '_>) -> Option<SourceSpec> {
                match self {
                    $(Self::$variant(c) => <$plugin as SourcePlugin>::validate(c, scope).map(SourceSpec::$variant),)+
                }
            }
        }

        impl SourceSpec {
            /// The value of `kind`.
            pub fn kind(&self) -> &'static str {
                match self { $(Self::$variant(_) => <$plugin as SourcePlugin>::KIND,)+ }
            }

            /// What every source has.
            pub fn common(&self) -> Common<'_> {
                match self { $(Self::$variant(s) => <$plugin as SourcePlugin>::common(s),)+ }
            }

            /// The keys that differ from `other` (`kind` if the kinds do).
            pub fn changed(&self, other: &Self) -> Vec<&'static str> {
                let mut keys = crate::config::KeyChanges::default();
                match (self, other) {
                    $((Self::$variant(a), Self::$variant(b)) => <$plugin as SourcePlugin>::changed(a, b, &mut keys),)+
                    #[allow(unreachable_patterns, reason = "with a single kind")]
                    _ => keys.key("kind", &self.kind(), &other.kind()),
                }
                keys.into_keys()
            }

            /// Builds the source (see [`SourcePlugin::build`]).
            pub fn build(&self, env: &BuildEnv, ctx: &SourceContext) -> Result<BuiltSource, SourceError> {
                match self { $(Self::$variant(s) => <$plugin as SourcePlugin>::build(s, env, ctx),)+ }
            }
        }

        impl<'de> serde::Deserialize<'de> for SourceConfig {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let (kind, table) = crate::config::schema::tagged::<D>(d)?;
                $(if kind == <$plugin as SourcePlugin>::KIND {
                    return crate::config::schema::inner(table).map(Self::$variant);
                })+
                Err(crate::config::schema::unknown_kind("source", &kind, KINDS))
            }
        }
    };
}
pub(crate) use source_kinds;
