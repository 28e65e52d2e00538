//! The store-revenue pipeline's side of its WIT contract (`wit/sales/sales-rules.wit`): the host
//! bindings, generated once here and re-exported narrowly, how the sandbox hosts the
//! `sales-rules` world (its imports, its smoke test) and calls it (`validate`, one call per
//! batch of packed payloads), and the check of what a call returns against the contract.

mod generated {
    wasmtime::component::bindgen!({
        path: "../wit/sales",
        world: "sales-rules",
        additional_derives: [PartialEq, Eq],
    });
}

use crate::sandbox::{CallError, Contract, Evaluator, GuestLog, RulesInstance, StoreData};
use generated::fooddelivery::sales_rules::host_log::{Host as HostLog, Level as LogLevel};
use generated::fooddelivery::sales_rules::types::Host as HostTypes;
pub use generated::fooddelivery::sales_rules::types::{
    BatchResult, Rejected, Rejection, RejectionCode, Sale,
};
use generated::{SalesRules, SalesRulesPre};
use wasmtime::component::{HasSelf, InstancePre, Linker};
use wasmtime::Store;

/// The WIT package and version this runner was built against.
pub const WIT_PACKAGE: &str = "fooddelivery:sales-rules";
pub const WIT_VERSION: &str = "1.0.0";

/// The `sales-rules` world, as the sandbox hosts it.
#[derive(Debug, Clone, Copy)]
pub struct SalesContract;

/// The engine, loaded component, instance, handle, reloader and evaluator of the sales rules.
pub type RulesEngine = crate::sandbox::RulesEngine<SalesContract>;
pub type LoadedRules = crate::sandbox::LoadedRules<SalesContract>;
pub type SalesInstance = RulesInstance<SalesContract>;
pub type RulesHandle = crate::sandbox::RulesHandle<SalesContract>;
pub type Reloader = crate::sandbox::Reloader<SalesContract>;
pub type SalesEvaluator = Evaluator<SalesContract>;

impl RejectionCode {
    /// The snake_case code carried in dead-letter headers.
    pub fn as_str(&self) -> &'static str {
        match self {
            RejectionCode::NotUtf8 => "not_utf8",
            RejectionCode::MalformedJson => "malformed_json",
            RejectionCode::NotAnObject => "not_an_object",
            RejectionCode::MissingField => "missing_field",
            RejectionCode::WrongType => "wrong_type",
            RejectionCode::EmptyStore => "empty_store",
            RejectionCode::NegativePrice => "negative_price",
            RejectionCode::TooPrecise => "too_precise",
            RejectionCode::OutOfRange => "out_of_range",
        }
    }
}

impl HostTypes for StoreData {}

impl HostLog for StoreData {
    fn log(&mut self, level: LogLevel, message: String) {
        let level = match level {
            LogLevel::Error => GuestLog::Error,
            LogLevel::Warn => GuestLog::Warn,
            LogLevel::Info => GuestLog::Info,
            LogLevel::Debug => GuestLog::Debug,
        };
        StoreData::log(self, level, message)
    }
}

impl Contract for SalesContract {
    const PACKAGE: &'static str = WIT_PACKAGE;
    const VERSION: &'static str = WIT_VERSION;
    const WORLD: &'static str = "sales-rules";
    const IMPORTS: &'static [&'static str] = &["host-log", "types"];
    const EXPORT: &'static str = "rules";
    type Pre = SalesRulesPre<StoreData>;
    type Bindings = SalesRules;

    fn add_to_linker(linker: &mut Linker<StoreData>) -> wasmtime::Result<()> {
        SalesRules::add_to_linker::<StoreData, HasSelf<StoreData>>(linker, |s| s)
    }

    fn pre(pre: InstancePre<StoreData>) -> wasmtime::Result<Self::Pre> {
        SalesRulesPre::new(pre)
    }

    fn instantiate(
        pre: &Self::Pre,
        store: &mut Store<StoreData>,
    ) -> wasmtime::Result<Self::Bindings> {
        pre.instantiate(store)
    }

    fn version(b: &Self::Bindings, store: &mut Store<StoreData>) -> wasmtime::Result<String> {
        b.fooddelivery_sales_rules_rules().call_version(store)
    }

    /// A batch of a known sale and a known bad one: the sale must come back with its exact
    /// amount in cents, the other as a wrong-type rejection of its price.
    fn smoke(instance: &mut SalesInstance) -> Result<(), String> {
        const GOOD: &str =
            r#"{"store": "store-1", "item": "coffee", "price": 2.87, "ts": 1756809000}"#;
        const BAD: &str =
            r#"{"store": "store-1", "item": "coffee", "price": "2.87", "ts": 1756809000}"#;
        let mut packed = PackedPayloads::default();
        packed.push(GOOD.as_bytes());
        packed.push(BAD.as_bytes());
        let result = instance
            .validate(packed.bytes(), packed.ends(), 2)
            .map_err(|e| format!("validate failed on the smoke batch: {e}"))?;
        let want = Sale {
            index: 0,
            store: "store-1".into(),
            amount_minor: 287,
            event_time: 1_756_809_000,
        };
        match result.sales.as_slice() {
            [sale] if *sale == want => {}
            other => return Err(format!("a sale of 2.87 came back as {other:?}")),
        }
        match result.rejections.as_slice() {
            [r] if r.rejection.code == RejectionCode::WrongType
                && r.rejection.field.as_deref() == Some("price") => {}
            other => {
                return Err(format!(
                    "a price given as a string was not rejected as wrong_type: {other:?}"
                ))
            }
        }
        Ok(())
    }
}

impl RulesInstance<SalesContract> {
    pub fn version(&mut self) -> Result<String, CallError> {
        self.call(self.limits().call_timeout, SalesContract::version)
    }

    /// Validates a batch of packed payloads (`payloads` concatenated, `ends[i]` where message
    /// i ends: see [`PackedPayloads`]) with prices in units of `minor_digits` decimal digits.
    /// The deadline grows with the batch. The result is checked against the contract (see
    /// [`check_batch`]): one that breaks it is a [`CallError::BadOutput`].
    ///
    /// # Panics
    /// When the packing is not the one the contract promises the guest: `ends` out of order,
    /// or its last not `payloads.len()`.
    pub fn validate(
        &mut self,
        payloads: &[u8],
        ends: &[u32],
        minor_digits: u8,
    ) -> Result<BatchResult, CallError> {
        assert!(
            ends.last().map_or(0, |&e| e as usize) == payloads.len()
                && ends.windows(2).all(|w| w[0] <= w[1]),
            "packed payloads: end offsets must be in order and the last one the buffer's length"
        );
        let timeout = self.timeout_for(ends.len());
        let result = self.call(timeout, |b, store| {
            b.fooddelivery_sales_rules_rules()
                .call_validate(store, payloads, ends, minor_digits)
        })?;
        check_batch(&result, ends.len()).map_err(CallError::BadOutput)?;
        Ok(result)
    }
}

impl Evaluator<SalesContract> {
    /// [`RulesInstance::validate`] on the current rules' live instance.
    pub fn validate(
        &mut self,
        payloads: &[u8],
        ends: &[u32],
        minor_digits: u8,
    ) -> Result<BatchResult, CallError> {
        self.with_instance(|i| i.validate(payloads, ends, minor_digits))
    }
}

/// Checks what `validate` returned for a batch of `n` messages against the contract: every
/// index 0..n in exactly one of the two lists, each list in batch order, and every sale what
/// the WIT promises (a store id, an amount that is not negative).
pub fn check_batch(result: &BatchResult, n: usize) -> Result<(), String> {
    let (sales, rejections) = (&result.sales, &result.rejections);
    if sales.len() + rejections.len() != n {
        return Err(format!(
            "a batch of {n} messages came back as {} sales and {} rejections",
            sales.len(),
            rejections.len()
        ));
    }
    // A merge of the two lists must meet the indexes 0, 1, 2, … in turn.
    let (mut s, mut r) = (0, 0);
    for next in 0..n {
        let in_sales = sales.get(s).is_some_and(|x| x.index as usize == next);
        let in_rejections = rejections.get(r).is_some_and(|x| x.index as usize == next);
        match (in_sales, in_rejections) {
            (true, false) => s += 1,
            (false, true) => r += 1,
            (true, true) => return Err(format!("message {next} is both a sale and a rejection")),
            (false, false) => {
                return Err(format!(
                    "message {next} is missing, repeated or out of batch order in the result"
                ))
            }
        }
    }
    if let Some(sale) = sales
        .iter()
        .find(|x| x.store.is_empty() || x.amount_minor < 0)
    {
        return Err(format!(
            "sale {} breaks the contract: store {:?}, amount {}",
            sale.index, sale.store, sale.amount_minor
        ));
    }
    Ok(())
}

/// Payloads packed as `validate` takes them: one buffer plus end offsets (`payloads` and `ends`
/// in the WIT). Cleared and refilled batch after batch, so the buffers are allocated once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackedPayloads {
    bytes: Vec<u8>,
    ends: Vec<u32>,
}

impl PackedPayloads {
    pub fn new() -> Self {
        PackedPayloads::default()
    }

    /// Empties both buffers, keeping their capacity.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    /// Appends one payload.
    ///
    /// # Panics
    /// Past 4 GiB of payloads in all: offsets are `u32` in the WIT (and a guest's memory is
    /// smaller).
    pub fn push(&mut self, payload: &[u8]) {
        self.bytes.extend_from_slice(payload);
        let end = u32::try_from(self.bytes.len()).expect("packed payloads exceed 4 GiB");
        self.ends.push(end);
    }

    /// The number of payloads.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The payloads concatenated.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Where each payload ends in [`PackedPayloads::bytes`].
    pub fn ends(&self) -> &[u32] {
        &self.ends
    }

    /// Payload `i`.
    ///
    /// # Panics
    /// When `i` is not below [`PackedPayloads::len`].
    pub fn get(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.bytes[start..self.ends[i] as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sale(index: u32) -> Sale {
        Sale {
            index,
            store: "s".into(),
            amount_minor: 1,
            event_time: 1_000_000_000,
        }
    }

    fn rejected(index: u32) -> Rejected {
        Rejected {
            index,
            rejection: Rejection {
                code: RejectionCode::MalformedJson,
                field: None,
                detail: "x".into(),
            },
        }
    }

    fn batch(sales: &[u32], rejections: &[u32]) -> BatchResult {
        BatchResult {
            sales: sales.iter().map(|&i| sale(i)).collect(),
            rejections: rejections.iter().map(|&i| rejected(i)).collect(),
        }
    }

    #[test]
    fn a_batch_covering_every_index_once_in_order_passes() {
        assert_eq!(check_batch(&batch(&[], &[]), 0), Ok(()));
        assert_eq!(check_batch(&batch(&[0, 2, 3], &[1, 4]), 5), Ok(()));
        assert_eq!(check_batch(&batch(&[], &[0, 1]), 2), Ok(()));
    }

    #[test]
    fn a_batch_breaking_the_contract_is_refused() {
        for (sales, rejections, n) in [
            (&[0, 1][..], &[][..], 3), // one missing
            (&[0, 1, 2], &[], 2),      // one too many
            (&[0, 0], &[], 2),         // repeated
            (&[1, 0], &[], 2),         // out of order
            (&[0], &[0], 2),           // in both lists
            (&[0, 2], &[3], 3),        // past the batch
            (&[0], &[2, 1], 3),        // rejections out of order
            (&[u32::MAX], &[], 1),     // far past the batch
        ] {
            assert!(
                check_batch(&batch(sales, rejections), n).is_err(),
                "{sales:?} {rejections:?} of {n}"
            );
        }
    }

    #[test]
    fn a_sale_breaking_the_contract_is_refused() {
        let mut b = batch(&[0], &[]);
        b.sales[0].amount_minor = -1;
        assert!(check_batch(&b, 1).is_err());
        let mut b = batch(&[0], &[]);
        b.sales[0].store.clear();
        assert!(check_batch(&b, 1).is_err());
    }

    #[test]
    fn packed_payloads_are_reused() {
        let mut p = PackedPayloads::new();
        p.push(b"ab");
        p.push(b"");
        p.push(b"cde");
        assert_eq!(
            (p.len(), p.bytes(), p.ends()),
            (3, &b"abcde"[..], &[2, 2, 5][..])
        );
        p.clear();
        assert!(p.is_empty());
        p.push(b"x");
        assert_eq!((p.bytes(), p.ends()), (&b"x"[..], &[1][..]));
    }

    #[test]
    fn rejection_codes_are_snake_case() {
        assert_eq!(RejectionCode::NotUtf8.as_str(), "not_utf8");
        assert_eq!(RejectionCode::EmptyStore.as_str(), "empty_store");
        assert_eq!(RejectionCode::NegativePrice.as_str(), "negative_price");
        assert_eq!(RejectionCode::TooPrecise.as_str(), "too_precise");
        assert_eq!(RejectionCode::OutOfRange.as_str(), "out_of_range");
    }
}
