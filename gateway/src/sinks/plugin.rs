//! The plug-in point of `[[sinks]]`: what a sink kind provides
//! ([`SinkPlugin`]) and the macro that turns the one-line list of kinds in
//! [`super`] into the `kind`-tagged enums the rest of the gateway dispatches
//! on ([`super::SinkConfig`], [`super::SinkKind`]).

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use super::{SinkCommon, SinkContext};
use crate::config::schema::SinkOutboxConfig;
use crate::config::{EnvelopeFormat, KeyChanges, Scope};

/// A kind of `[[sinks]]` entry, chosen by its `kind` key.
pub trait SinkPlugin {
    /// The value of `kind`.
    const KIND: &'static str;
    /// The table as written (without `kind`); serde with
    /// `deny_unknown_fields`.
    type Config: serde::de::DeserializeOwned + fmt::Debug + Clone;
    /// The kind's own validated settings.
    type Spec: fmt::Debug + Clone + PartialEq + Send + Sync + 'static;

    /// The keys every sink has, before validation.
    fn common(config: &Self::Config) -> CommonKeys<'_>;
    /// Checks the kind's own keys, reporting every problem through `scope`;
    /// `None` if any was found.
    fn validate(config: &Self::Config, scope: &mut Scope<'_, '_>) -> Option<Self::Spec>;
    /// Records which of the kind's keys differ (a restart applies them).
    fn changed(a: &Self::Spec, b: &Self::Spec, keys: &mut KeyChanges);
    /// The MQTT connection settings (endpoint, keep-alive) another client
    /// may reuse, such as the fleet agent's (`fleet.sink`); `None` for
    /// kinds that are not MQTT.
    fn mqtt_connection(
        _spec: &Self::Spec,
    ) -> Option<(&crate::config::MqttEndpoint, std::time::Duration)> {
        None
    }

    /// The filters the sink receives cloud commands on (`subscribe`); a sink
    /// with any gets the router. None by default.
    fn subscriptions(spec: &Self::Spec) -> &[crate::topic::TopicFilter] {
        let _ = spec;
        &[]
    }
    /// Creates the clients and TLS settings the sink delivers with; starts
    /// no task and connects nowhere, so `edgefn check` runs it too.
    fn build(
        common: SinkCommon,
        spec: &Self::Spec,
        env: &SinkEnv<'_>,
    ) -> Result<BuiltSink, SinkError>;
}

/// The keys every sink kind has, as written.
#[derive(Debug, Clone, Copy)]
pub struct CommonKeys<'a> {
    /// `name`.
    pub name: &'a str,
    /// `format`.
    pub format: EnvelopeFormat,
    /// `batch_max`.
    pub batch_max: usize,
    /// `batch_linger_ms`.
    pub batch_linger_ms: u64,
    /// `[sinks.outbox]`.
    pub outbox: &'a SinkOutboxConfig,
}

/// What building a sink may use besides its settings.
#[derive(Default, Clone, Copy)]
pub struct SinkEnv<'a> {
    /// The embedded broker, when it runs (`None` in `edgefn check`): a sink
    /// pointed at its guarded listener connects to it directly.
    pub broker: Option<&'a crate::broker::Running>,
}

/// A sink ready to run: give it its context and spawn the future.
pub type BuiltSink =
    Box<dyn FnOnce(SinkContext) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Why a sink could not be built.
#[derive(Debug, thiserror::Error)]
#[error("sinks.{sink}: {what}: {}", crate::text::chain(.source.as_ref()))]
pub struct SinkError {
    /// Which sink.
    pub sink: String,
    /// What was being set up (`tls.ca`, `HTTP client`, …).
    pub what: &'static str,
    /// The underlying error.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Declares the sink kinds: one `Variant(module::Plugin)` line each.
macro_rules! sink_kinds {
    ($($variant:ident($plugin:ty)),+ $(,)?) => {
        /// A `[[sinks]]` entry as written, by `kind`.
        #[derive(Debug, Clone)]
        #[allow(missing_docs, reason = "one variant per kind, named after it")]
        pub enum SinkConfig {
            $($variant(<$plugin as SinkPlugin>::Config),)+
        }

        /// A validated sink's kind-specific settings, by `kind`.
        #[derive(Debug, Clone, PartialEq)]
        #[allow(missing_docs, reason = "one variant per kind, named after it")]
        pub enum SinkKind {
            $($variant(<$plugin as SinkPlugin>::Spec),)+
        }

        /// Every sink `kind`, in the order of the list.
        pub const KINDS: &[&str] = &[$(<$plugin as SinkPlugin>::KIND),+];

        impl SinkConfig {
            /// The keys every sink has.
            pub fn common(&self) -> CommonKeys<'_> {
                match self { $(Self::$variant(c) => <$plugin as SinkPlugin>::common(c),)+ }
            }

            /// The sink's name, as functions refer to it.
            pub fn name(&self) -> &str {
                self.common().name
            }

            /// Validates the kind's own keys.
            pub fn validate(&self, scope: &mut crate::config::Scope<'_, '_>) -> Option<SinkKind> {
                match self {
                    $(Self::$variant(c) => <$plugin as SinkPlugin>::validate(c, scope).map(SinkKind::$variant),)+
                }
            }
        }

        impl SinkKind {
            /// The value of `kind`.
            pub fn kind(&self) -> &'static str {
                match self { $(Self::$variant(_) => <$plugin as SinkPlugin>::KIND,)+ }
            }

            /// The keys that differ from `other` (`kind` if the kinds do).
            pub fn changed(&self, other: &Self) -> Vec<&'static str> {
                let mut keys = crate::config::KeyChanges::default();
                match (self, other) {
                    $((Self::$variant(a), Self::$variant(b)) => <$plugin as SinkPlugin>::changed(a, b, &mut keys),)+
                    #[allow(unreachable_patterns, reason = "with a single kind")]
                    _ => keys.key("kind", &self.kind(), &other.kind()),
                }
                keys.into_keys()
            }

            /// The filters it receives cloud commands on.
            pub fn subscriptions(&self) -> &[crate::topic::TopicFilter] {
                match self { $(Self::$variant(s) => <$plugin as SinkPlugin>::subscriptions(s),)+ }
            }

            /// The MQTT connection another client may reuse, if any.
            pub fn mqtt_connection(&self) -> Option<(&crate::config::MqttEndpoint, std::time::Duration)> {
                match self { $(Self::$variant(s) => <$plugin as SinkPlugin>::mqtt_connection(s),)+ }
            }

            /// Builds the sink (see [`SinkPlugin::build`]).
            pub fn build(&self, common: SinkCommon, env: &SinkEnv<'_>) -> Result<BuiltSink, SinkError> {
                match self { $(Self::$variant(s) => <$plugin as SinkPlugin>::build(common, s, env),)+ }
            }
        }

        impl<'de> serde::Deserialize<'de> for SinkConfig {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let (kind, table) = crate::config::schema::tagged::<D>(d)?;
                $(if kind == <$plugin as SinkPlugin>::KIND {
                    return crate::config::schema::inner(table).map(Self::$variant);
                })+
                Err(crate::config::schema::unknown_kind("sink", &kind, KINDS))
            }
        }
    };
}
pub(crate) use sink_kinds;
