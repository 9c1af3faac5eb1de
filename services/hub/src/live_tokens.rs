//! The tokens this hub's open connections hold, for what can void a token while it is in use: a
//! revocation (4003) and, with `auth.close_on_key_removal`, its key leaving the key set (4004).
//!
//! One registry per hub and one task that scans it when either list changes, instead of a
//! watcher per connection: a change is rare, a connection lives long, and every byte a
//! connection holds is held a hundred thousand times. A connection registers before it checks
//! the lists once itself, and the task scans after the list changed, both under the registry's
//! lock: whichever comes second sees the other, so no connection slips between them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hub_protocol::CloseCode;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::auth::Identity;
use crate::auth::keys::KeySet;
use crate::outbox::{CloseReason, Outbox};
use crate::revocation::{RevocationList, TokenFacts};
use crate::token::unix_now;

/// What the registry keeps of a connection's token.
struct Held {
    sub: Box<str>,
    iat: Option<u64>,
    jti: Option<Arc<str>>,
    kid: Option<Arc<str>>,
    outbox: Outbox,
}

impl Held {
    fn facts(&self) -> TokenFacts<'_> {
        TokenFacts {
            sub: &self.sub,
            iat: self.iat,
            jti: self.jti.as_deref(),
        }
    }
}

/// The lists a token is checked against.
pub struct Lists {
    pub revocations: watch::Receiver<Arc<RevocationList>>,
    /// `None` without `auth.close_on_key_removal` (or without a key set).
    pub keys: Option<watch::Receiver<Arc<KeySet>>>,
}

impl Lists {
    /// Why a token may not go on, if it may not.
    fn refuses(&self, held: &Held, now: u64) -> Option<CloseCode> {
        if self.revocations.borrow().voids(held.facts(), now) {
            return Some(CloseCode::Revoked);
        }
        let removed = |keys: &watch::Receiver<Arc<KeySet>>| {
            held.kid
                .as_ref()
                .is_some_and(|kid| !keys.borrow().contains(kid))
        };
        self.keys
            .as_ref()
            .is_some_and(removed)
            .then_some(CloseCode::KeyRemoved)
    }
}

#[derive(Default)]
pub struct LiveTokens {
    registry: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    held: HashMap<u64, Held>,
    /// Set by [`LiveTokens::close_all`]: a connection registering from then on is closed too.
    closing_all: Option<CloseReason>,
}

impl LiveTokens {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Closes every open connection with `reason`, and every one that registers from now on:
    /// the hub's drain. Under the registry's lock, so a connection registering meanwhile is
    /// either found here or finds the flag.
    pub fn close_all(&self, reason: CloseReason) -> usize {
        let mut registry = self.lock();
        registry.closing_all = Some(reason);
        for entry in registry.held.values() {
            entry.outbox.close(reason);
        }
        registry.held.len()
    }

    /// Registers connection `outbox`'s token, then checks it once against `lists` (closing the
    /// connection if they refuse it already). Dropping the returned guard unregisters it.
    pub fn hold<'a>(&'a self, identity: &Identity, outbox: &Outbox, lists: &Lists) -> Holding<'a> {
        self.replace(identity, outbox, lists);
        Holding {
            tokens: self,
            id: outbox.id(),
        }
    }

    /// Registers (or, after a `refresh`, replaces) the connection's token and checks it: in one
    /// critical section with the insert, so a scan after a list changed either finds the entry
    /// or comes before this check, which then reads the changed list.
    pub fn replace(&self, identity: &Identity, outbox: &Outbox, lists: &Lists) {
        let held = held_of(identity, outbox.clone());
        let mut registry = self.lock();
        let refused = lists.refuses(&held, unix_now());
        registry.held.insert(outbox.id(), held);
        let closing_all = registry.closing_all;
        drop(registry);
        if let Some(code) = refused {
            outbox.close(CloseReason::Hub(code));
        }
        if let Some(reason) = closing_all {
            outbox.close(reason);
        }
    }

    /// Closes every connection whose token `lists` refuse; how many it closed.
    fn enforce_now(&self, lists: &Lists) -> usize {
        let now = unix_now();
        let registry = self.lock();
        let mut closed = 0;
        for entry in registry.held.values() {
            if let Some(code) = lists.refuses(entry, now)
                && !entry.outbox.is_closed()
            {
                entry.outbox.close(CloseReason::Hub(code));
                closed += 1;
            }
        }
        closed
    }
}

fn held_of(identity: &Identity, outbox: Outbox) -> Held {
    Held {
        sub: identity.sub.as_str().into(),
        iat: identity.iat,
        jti: identity.jti.clone(),
        kid: identity.kid.clone(),
        outbox,
    }
}

/// A connection's place in the registry; dropped, at the end or by a panic's unwinding, it
/// leaves.
pub struct Holding<'a> {
    tokens: &'a LiveTokens,
    id: u64,
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.tokens.lock().held.remove(&self.id);
    }
}

/// Closes the connections whose tokens a change of the revocations (or of the key set) voids,
/// until `shutdown`.
pub async fn enforce(tokens: Arc<LiveTokens>, mut lists: Lists, shutdown: CancellationToken) {
    loop {
        let changed = tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = lists.revocations.changed() => changed.is_ok(),
            changed = async {
                match lists.keys.as_mut() {
                    Some(keys) => keys.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            } => changed,
        };
        if !changed {
            return;
        }
        let closed = tokens.enforce_now(&lists);
        if closed > 0 {
            info!(
                closed,
                "connections closed: their tokens are revoked or their keys removed"
            );
        }
    }
}
