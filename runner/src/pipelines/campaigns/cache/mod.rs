//! The subscriber cache: every subscription in memory, so a campaign never waits on the
//! database, kept fresh by the database itself.
//!
//! - A snapshot is immutable: a compact base (ids that are canonical UUIDs stored as 16 bytes,
//!   any other text kept as text; per restaurant, sorted and without duplicates) plus a small
//!   overlay of changes. A new snapshot is swapped in whole (`arc-swap`): readers never block.
//! - The base is loaded with a binary COPY. Changes arrive through LISTEN/NOTIFY from the
//!   statement triggers installed by the schema step (`sql/subscriptions_feed.sql`): each
//!   notification says whether each touched (restaurant, client) pair exists after the commit.
//! - After a lost connection the cache is stale until a full resync (LISTEN first, then COPY,
//!   then the notifications that arrived meanwhile, in order) has completed; campaigns wait.
//!
//! Here: the snapshot and the handle readers use; `follower.rs`: loading and following.

mod follower;

pub use follower::CHANNEL;

use arc_swap::ArcSwap;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

/// An id as stored: a canonical (lowercase, hyphenated) UUID as 16 bytes, or the text itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Id {
    Uuid(u128),
    Text(Box<str>),
}

/// A borrowed id, as lookups return them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdRef<'a> {
    Uuid(u128),
    Text(&'a str),
}

/// Parses text as a canonical UUID, or None (other spellings stay text, so that drafts carry
/// exactly the text of the table).
fn canonical_uuid(s: &str) -> Option<u128> {
    if s.len() != 36 {
        return None;
    }
    let u = uuid::Uuid::try_parse(s).ok()?;
    let mut buf = uuid::Uuid::encode_buffer();
    (u.hyphenated().encode_lower(&mut buf) == s).then(|| u.as_u128())
}

impl Id {
    pub fn parse(s: &str) -> Id {
        match canonical_uuid(s) {
            Some(u) => Id::Uuid(u),
            None => Id::Text(s.into()),
        }
    }

    fn as_ref(&self) -> IdRef<'_> {
        match self {
            Id::Uuid(u) => IdRef::Uuid(*u),
            Id::Text(t) => IdRef::Text(t),
        }
    }
}

impl IdRef<'_> {
    /// Appends the id's text to `out` (no allocation when `out` has room).
    pub fn write_to(self, out: &mut String) {
        match self {
            IdRef::Uuid(u) => {
                let mut buf = uuid::Uuid::encode_buffer();
                out.push_str(uuid::Uuid::from_u128(u).hyphenated().encode_lower(&mut buf));
            }
            IdRef::Text(t) => out.push_str(t),
        }
    }

    pub fn to_text(self) -> String {
        let mut s = String::with_capacity(36);
        self.write_to(&mut s);
        s
    }
}

/// Where one restaurant's clients are in the base's flat arrays.
#[derive(Debug, Clone, Copy, Default)]
struct Span {
    uuid_start: u32,
    uuid_len: u32,
    text_start: u32,
    text_len: u32,
}

/// The compact, immutable part of a snapshot.
#[derive(Debug, Default)]
struct Base {
    by_uuid: HashMap<u128, Span>,
    by_text: HashMap<Box<str>, Span>,
    uuid_clients: Vec<u128>,
    text_clients: Vec<Box<str>>,
    rows: usize,
}

impl Base {
    fn span(&self, restaurant: &str) -> Option<Span> {
        match canonical_uuid(restaurant) {
            Some(u) => self.by_uuid.get(&u).copied(),
            None => self.by_text.get(restaurant).copied(),
        }
    }

    fn slices(&self, s: Span) -> (&[u128], &[Box<str>]) {
        let u = s.uuid_start as usize..(s.uuid_start + s.uuid_len) as usize;
        let t = s.text_start as usize..(s.text_start + s.text_len) as usize;
        (&self.uuid_clients[u], &self.text_clients[t])
    }

    pub(crate) fn contains(&self, restaurant: &str, client: IdRef<'_>) -> bool {
        let Some(s) = self.span(restaurant) else {
            return false;
        };
        let (uuids, texts) = self.slices(s);
        match client {
            IdRef::Uuid(u) => uuids.binary_search(&u).is_ok(),
            IdRef::Text(t) => texts.binary_search_by(|x| (**x).cmp(t)).is_ok(),
        }
    }

    fn subscriptions(&self) -> usize {
        self.uuid_clients.len() + self.text_clients.len()
    }
}

/// Builds a base from (restaurant, client) rows in any order. Pairs of canonical UUIDs (the
/// usual case) go to one flat vector, sorted once; pairs with any text id go aside.
#[derive(Debug, Default)]
struct BaseBuilder {
    uuid_pairs: Vec<(u128, u128)>,
    other: Vec<(Id, Id)>,
    rows: usize,
}

impl BaseBuilder {
    fn push(&mut self, restaurant: &str, client: &str) {
        self.rows += 1;
        match (canonical_uuid(restaurant), canonical_uuid(client)) {
            (Some(r), Some(c)) => self.uuid_pairs.push((r, c)),
            (r, c) => self.other.push((
                r.map_or_else(|| Id::Text(restaurant.into()), Id::Uuid),
                c.map_or_else(|| Id::Text(client.into()), Id::Uuid),
            )),
        }
    }

    fn build(mut self) -> Base {
        self.uuid_pairs.sort_unstable();
        self.uuid_pairs.dedup();
        self.other.sort_unstable();
        self.other.dedup();
        let mut base = Base {
            rows: self.rows,
            ..Base::default()
        };
        base.uuid_clients.reserve_exact(self.uuid_pairs.len());
        let mut i = 0;
        while i < self.uuid_pairs.len() {
            let r = self.uuid_pairs[i].0;
            let start = base.uuid_clients.len();
            while i < self.uuid_pairs.len() && self.uuid_pairs[i].0 == r {
                base.uuid_clients.push(self.uuid_pairs[i].1);
                i += 1;
            }
            let span = Span {
                uuid_start: start as u32,
                uuid_len: (base.uuid_clients.len() - start) as u32,
                ..Span::default()
            };
            base.by_uuid.insert(r, span);
        }
        drop(self.uuid_pairs);
        // Pairs with text: sorted by restaurant, then client (UUIDs before text).
        let mut i = 0;
        while i < self.other.len() {
            let r = self.other[i].0.clone();
            let (u0, t0) = (base.uuid_clients.len(), base.text_clients.len());
            while i < self.other.len() && self.other[i].0 == r {
                match std::mem::replace(&mut self.other[i].1, Id::Uuid(0)) {
                    Id::Uuid(c) => base.uuid_clients.push(c),
                    Id::Text(c) => base.text_clients.push(c),
                }
                i += 1;
            }
            let (u_len, t_len) = (
                (base.uuid_clients.len() - u0) as u32,
                (base.text_clients.len() - t0) as u32,
            );
            match r {
                // A UUID restaurant here has text clients only: its UUID clients came first.
                Id::Uuid(u) => {
                    let span = base.by_uuid.entry(u).or_default();
                    span.text_start = t0 as u32;
                    span.text_len = t_len;
                }
                Id::Text(t) => {
                    let span = Span {
                        uuid_start: u0 as u32,
                        uuid_len: u_len,
                        text_start: t0 as u32,
                        text_len: t_len,
                    };
                    base.by_text.insert(t, span);
                }
            }
        }
        base.uuid_clients.shrink_to_fit();
        base.text_clients.shrink_to_fit();
        base.by_uuid.shrink_to_fit();
        base.by_text.shrink_to_fit();
        base
    }
}

/// Bytes the snapshot's structures hold (not counting allocator overhead).
impl Base {
    fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        self.uuid_clients.capacity() * size_of::<u128>()
            + self.text_clients.capacity() * size_of::<Box<str>>()
            + self.text_clients.iter().map(|t| t.len()).sum::<usize>()
            + self.by_uuid.capacity() * (size_of::<u128>() + size_of::<Span>() + 1)
            + self.by_text.capacity() * (size_of::<Box<str>>() + size_of::<Span>() + 1)
            + self.by_text.keys().map(|k| k.len()).sum::<usize>()
    }
}

/// One restaurant's changes since the base was loaded: per client, present or not.
#[derive(Debug, Default, Clone)]
struct Changes {
    uuids: BTreeMap<u128, bool>,
    texts: BTreeMap<Box<str>, bool>,
}

impl Changes {
    fn get(&self, id: IdRef<'_>) -> Option<bool> {
        match id {
            IdRef::Uuid(u) => self.uuids.get(&u).copied(),
            IdRef::Text(t) => self.texts.get(t).copied(),
        }
    }

    fn set(&mut self, id: Id, present: bool) {
        match id {
            Id::Uuid(u) => self.uuids.insert(u, present),
            Id::Text(t) => self.texts.insert(t, present),
        };
    }

    fn len(&self) -> usize {
        self.uuids.len() + self.texts.len()
    }

    /// Clients present here (whether or not the base has them).
    fn present(&self) -> impl Iterator<Item = IdRef<'_>> {
        let u = self
            .uuids
            .iter()
            .filter(|(_, p)| **p)
            .map(|(u, _)| IdRef::Uuid(*u));
        let t = self
            .texts
            .iter()
            .filter(|(_, p)| **p)
            .map(|(t, _)| IdRef::Text(t));
        u.chain(t)
    }
}

/// Changes since the base was loaded, per restaurant.
type Overlay = HashMap<Box<str>, Changes>;

/// One immutable view of `subscribers_restaurants`.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    version: u64,
    base: Arc<Base>,
    overlay: Arc<Overlay>,
    subscriptions: usize,
}

impl Snapshot {
    /// Builds a snapshot from (restaurant_id, client_id) rows in any order.
    pub fn from_rows<'a>(
        version: u64,
        rows: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Snapshot {
        let mut b = BaseBuilder::default();
        for (r, c) in rows {
            b.push(r, c);
        }
        Snapshot::from_base(version, b.build())
    }

    fn from_base(version: u64, base: Base) -> Snapshot {
        let subscriptions = base.subscriptions();
        Snapshot {
            version,
            base: Arc::new(base),
            overlay: Arc::default(),
            subscriptions,
        }
    }

    /// The distinct subscribers of a restaurant, without allocating: the base's clients not
    /// removed since, then the clients added since.
    pub fn clients<'a>(&'a self, restaurant_id: &'a str) -> impl Iterator<Item = IdRef<'a>> + 'a {
        let (uuids, texts) = match self.base.span(restaurant_id) {
            Some(s) => self.base.slices(s),
            None => (&[][..], &[][..]),
        };
        let changes = self.overlay.get(restaurant_id);
        let kept = move |id: &IdRef<'_>| changes.is_none_or(|c| c.get(*id) != Some(false));
        let base = uuids
            .iter()
            .map(|u| IdRef::Uuid(*u))
            .chain(texts.iter().map(|t| IdRef::Text(t)))
            .filter(kept);
        let added = changes
            .into_iter()
            .flat_map(Changes::present)
            .filter(move |id| !self.base.contains(restaurant_id, *id));
        base.chain(added)
    }

    /// Writes the distinct subscribers of a restaurant into `out` as text, reusing its Strings.
    pub fn clients_into(&self, restaurant_id: &str, out: &mut Vec<String>) {
        let mut n = 0;
        for id in self.clients(restaurant_id) {
            if n < out.len() {
                out[n].clear();
                id.write_to(&mut out[n]);
            } else {
                out.push(id.to_text());
            }
            n += 1;
        }
        out.truncate(n);
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Distinct (restaurant, client) pairs.
    pub fn subscriptions(&self) -> usize {
        self.subscriptions
    }

    /// Rows the base was loaded from, duplicates included.
    pub fn rows(&self) -> usize {
        self.base.rows
    }

    pub fn restaurants(&self) -> usize {
        self.base.by_uuid.len() + self.base.by_text.len()
    }

    /// Bytes held by the base's structures (allocator overhead excluded).
    pub fn heap_bytes(&self) -> usize {
        self.base.heap_bytes()
    }

    fn overlay_len(&self) -> usize {
        self.overlay.values().map(Changes::len).sum()
    }

    /// A new snapshot with `changes` applied: (restaurant, client, present after the commit).
    fn with_changes(&self, version: u64, changes: &[(String, String, bool)]) -> Snapshot {
        let mut overlay = (*self.overlay).clone();
        let mut subscriptions = self.subscriptions as i64;
        for (restaurant, client, present) in changes {
            let id = Id::parse(client);
            let entry = overlay.entry(restaurant.as_str().into()).or_default();
            let was = entry
                .get(id.as_ref())
                .unwrap_or_else(|| self.base.contains(restaurant, id.as_ref()));
            subscriptions += i64::from(*present) - i64::from(was);
            entry.set(id, *present);
        }
        Snapshot {
            version,
            base: self.base.clone(),
            overlay: Arc::new(overlay),
            subscriptions: subscriptions.max(0) as usize,
        }
    }
}

/// What changed in the subscriptions, as the follower applied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheChange {
    /// (restaurant, client) pairs a statement touched that exist after it: new subscriptions
    /// among them (and some that existed before). `version`: the snapshot that has them.
    Present {
        version: u64,
        pairs: Vec<(String, String)>,
    },
    /// The table was loaded in full (a bulk statement, a lost connection, the periodic
    /// resync): anything may have changed up to snapshot `version`.
    Reloaded { version: u64 },
}

/// The shared, swappable snapshot plus whether it can be trusted.
#[derive(Debug, Clone)]
pub struct SubscriberCache {
    current: Arc<ArcSwap<Snapshot>>,
    fresh: watch::Receiver<bool>,
    /// Full loads of the table so far (the first one included).
    resyncs: Arc<AtomicU64>,
    changes: tokio::sync::broadcast::Sender<Arc<CacheChange>>,
}

impl SubscriberCache {
    /// A cache that holds `snapshot` and never changes (for offline use: tools, tests).
    pub fn fixed(snapshot: Snapshot) -> SubscriberCache {
        SubscriberCache {
            current: Arc::new(ArcSwap::from_pointee(snapshot)),
            fresh: watch::channel(true).1,
            resyncs: Arc::default(),
            changes: tokio::sync::broadcast::channel(1).0,
        }
    }

    /// Follows what changes from now on (a fixed cache never changes).
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<Arc<CacheChange>> {
        self.changes.subscribe()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// True while the snapshot is known to be stale (lost connection, resync in progress).
    pub fn is_stale(&self) -> bool {
        !*self.fresh.borrow()
    }

    /// Waits until the snapshot can be trusted (after a resync); immediate when fresh.
    pub async fn wait_fresh(&self) {
        let mut fresh = self.fresh.clone();
        let _ = fresh.wait_for(|f| *f).await;
    }

    /// Full loads of the subscriber table so far (the first one included).
    pub fn resyncs(&self) -> u64 {
        self.resyncs.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(s: &Snapshot, r: &str) -> Vec<String> {
        let mut out = Vec::new();
        s.clients_into(r, &mut out);
        out.sort();
        out
    }

    const U1: &str = "123e4567-e89b-12d3-a456-426614174001";
    const U2: &str = "223e4567-e89b-12d3-a456-426614174000";
    const U3: &str = "323e4567-e89b-12d3-a456-426614174000";

    #[test]
    fn duplicates_collapse_text_ids_work_unknown_restaurants_are_empty() {
        let s = Snapshot::from_rows(
            1,
            [
                (U1, U3),
                (U1, U2),
                (U1, U2),
                ("shop-7", "alice"),
                ("shop-7", U2),
            ],
        );
        assert_eq!(texts(&s, U1), [U2, U3]);
        assert_eq!(texts(&s, "shop-7"), [U2, "alice"]);
        assert!(texts(&s, "nobody").is_empty());
        assert_eq!((s.rows(), s.subscriptions(), s.restaurants()), (5, 4, 2));
    }

    #[test]
    fn non_canonical_uuids_keep_their_text() {
        let upper = "323E4567-E89B-12D3-A456-426614174000";
        let s = Snapshot::from_rows(1, [(U1, upper)]);
        assert_eq!(texts(&s, U1), [upper]);
        assert!(matches!(Id::parse(upper), Id::Text(_)));
        assert!(matches!(Id::parse(U1), Id::Uuid(_)));
    }

    #[test]
    fn changes_add_remove_and_move_subscriptions() {
        let s = Snapshot::from_rows(1, [(U1, U2), (U1, U3)]);
        let s = s.with_changes(
            2,
            &[
                (U1.into(), U3.into(), false),
                (U1.into(), "bob".into(), true),
                ("shop".into(), U2.into(), true),
            ],
        );
        assert_eq!(texts(&s, U1), [U2.to_string(), "bob".to_string()]);
        assert_eq!(texts(&s, "shop"), [U2]);
        assert_eq!(s.subscriptions(), 3);
        // The iterator agrees with clients_into.
        let mut via_iter: Vec<String> = s.clients(U1).map(IdRef::to_text).collect();
        via_iter.sort();
        assert_eq!(via_iter, texts(&s, U1));
        // Present again; a change to an absent pair that says absent changes nothing.
        let s = s.with_changes(
            3,
            &[
                (U1.into(), U3.into(), true),
                (U1.into(), "ghost".into(), false),
            ],
        );
        assert_eq!(
            texts(&s, U1),
            [U2.to_string(), U3.to_string(), "bob".to_string()]
        );
        assert_eq!(s.subscriptions(), 4);
    }

    #[test]
    fn a_buffer_is_reused_without_leftovers() {
        let s = Snapshot::from_rows(1, [(U1, U2), (U1, U3), ("r", "x")]);
        let mut out = Vec::new();
        s.clients_into(U1, &mut out);
        assert_eq!(out.len(), 2);
        s.clients_into("r", &mut out);
        assert_eq!(out, ["x"]);
    }
}
