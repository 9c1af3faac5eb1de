//! What every request and connection of one hub shares, built once from the settings.
//!
//! This module depends only on the parts it assembles (config, auth, broker, metrics, limits);
//! the HTTP side and the connections depend on it, never the other way round.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use observability::RootSampler;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::broker::{Broker, MemoryBroker, RedisBroker};
use crate::config::{ConfigError, Settings};
use crate::limits::{ConnectionGate, IdentityLimits};
use crate::live_tokens::{Lists, LiveTokens};
use crate::metrics::Metrics;
use crate::revocation::RevocationStore;

/// Everything a request or connection handler needs, shared by all of them.
pub(crate) struct AppState {
    pub settings: Settings,
    pub node_id: Arc<str>,
    pub auth: Arc<Authenticator>,
    /// Where the pool's revocations are kept; `None`: the embedded broker without
    /// `auth.revocations_file`.
    pub revocations: Option<Arc<RevocationStore>>,
    /// Set once the revocation list has been read; true from the start without a store.
    pub revocations_loaded: Arc<AtomicBool>,
    /// The tokens of the open connections, closed when a revocation or key removal voids them.
    pub live_tokens: Arc<LiveTokens>,
    pub token_lists: Arc<Lists>,
    pub broker: Arc<dyn Broker>,
    pub metrics: Arc<Metrics>,
    pub gate: Arc<ConnectionGate>,
    /// Cancelled when the drain starts: the hub's background tasks stop. Connections are closed
    /// with 1012 through `live_tokens` (`LiveTokens::close_all`).
    pub shutdown: CancellationToken,
    /// Which new traces start here; off when spans are not exported, and then the
    /// per-connection and per-publication spans are not even built.
    pub roots: RootSampler,
    /// The connection tasks, waited for by the drain.
    pub connections: TaskTracker,
    draining: AtomicBool,
    next_id: AtomicU64,
}

impl AppState {
    /// Assembles the hub's parts around `metrics`: the authenticator, the broker the settings
    /// name (Redis with `broker.url` or `broker.cluster_nodes`, else the embedded one) and the
    /// admission gate.
    pub fn build(
        settings: Settings,
        metrics: Arc<Metrics>,
        roots: RootSampler,
    ) -> Result<AppState, ConfigError> {
        let auth = Authenticator::from_settings(&settings.auth)?;
        if let Some(keys) = auth.key_set() {
            metrics.auth_keys.set(keys.borrow().len() as i64);
        }
        let revocations = RevocationStore::from_settings(&settings)
            .map_err(|e| ConfigError::Invalid {
                key: "broker.url",
                message: e.to_string(),
            })?
            .map(Arc::new);
        let token_lists = auth.lists(settings.auth.close_on_key_removal);
        let node_id: Arc<str> = settings.resolved_node_id().into();
        let redis = settings.broker.url.is_some() || !settings.broker.cluster_nodes.is_empty();
        let broker: Arc<dyn Broker> = match redis {
            true => Arc::new(RedisBroker::new(
                &settings,
                &node_id,
                metrics.clone(),
                roots,
            )?),
            false => Arc::new(MemoryBroker::new(
                settings.history.clone(),
                settings.limits.max_channels,
                node_id.clone(),
                metrics.clone(),
            )),
        };
        let limits = &settings.limits;
        let gate = ConnectionGate::new(
            limits.max_connections,
            limits.connect_rate,
            limits.connect_burst,
            IdentityLimits {
                agent_connections: limits.max_connections_per_agent,
                viewer_connections: limits.max_connections_per_viewer,
                publish_rate: limits.publish_rate,
                publish_burst: limits.publish_burst,
            },
        );
        Ok(AppState {
            node_id,
            auth: Arc::new(auth),
            revocations_loaded: Arc::new(AtomicBool::new(revocations.is_none())),
            live_tokens: Arc::new(LiveTokens::default()),
            token_lists: Arc::new(token_lists),
            revocations,
            broker,
            metrics,
            gate,
            shutdown: CancellationToken::new(),
            roots,
            connections: TaskTracker::new(),
            draining: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            settings,
        })
    }

    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.broker.is_ready() && self.revocations_known()
    }

    /// Whether the revocation list has been read (or there is none to read): until then no
    /// upgrade is taken, so a restarted hub never lets a revoked token in.
    pub fn revocations_known(&self) -> bool {
        self.revocations_loaded.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Readiness off and new upgrades refused from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}
