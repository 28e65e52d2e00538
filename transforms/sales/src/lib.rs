//! The sales rules component of the store-revenue pipeline: the WIT glue around [`rules`].
//! Built for `wasm32-unknown-unknown` and turned into a component by `transforms/componentize`,
//! so it imports nothing but `host-log` (no WASI: no clock, files, network, environment or
//! random).

pub mod rules;

// wit-bindgen's generated export glue is `unsafe` by nature (raw ABI pointers).
#[cfg(all(target_arch = "wasm32", feature = "component"))]
#[allow(unsafe_code)]
mod component {
    use super::rules;

    wit_bindgen::generate!({
        path: "../../wit/sales",
        world: "sales-rules",
    });

    use exports::fooddelivery::sales_rules::rules::Guest;
    use fooddelivery::sales_rules::host_log::{log, Level};
    use fooddelivery::sales_rules::types::{BatchResult, Rejected, Rejection, RejectionCode, Sale};

    /// The version this component reports; the runner logs it and stamps it on its outputs.
    #[cfg(not(feature = "v2"))]
    const VERSION: &str = concat!("sales-rules ", env!("CARGO_PKG_VERSION"));
    #[cfg(feature = "v2")]
    const VERSION: &str = concat!("sales-rules ", env!("CARGO_PKG_VERSION"), "+v2");

    struct Component;
    export!(Component);

    /// A panic aborts the guest (a trap for the host); send its message to the host's log first.
    fn install_panic_hook() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            std::panic::set_hook(Box::new(|info| {
                log(Level::Error, &format!("rules panicked: {info}"))
            }));
        });
    }

    fn code(c: rules::Code) -> RejectionCode {
        match c {
            rules::Code::NotUtf8 => RejectionCode::NotUtf8,
            rules::Code::MalformedJson => RejectionCode::MalformedJson,
            rules::Code::NotAnObject => RejectionCode::NotAnObject,
            rules::Code::MissingField => RejectionCode::MissingField,
            rules::Code::WrongType => RejectionCode::WrongType,
            rules::Code::EmptyStore => RejectionCode::EmptyStore,
            rules::Code::NegativePrice => RejectionCode::NegativePrice,
            rules::Code::TooPrecise => RejectionCode::TooPrecise,
            rules::Code::OutOfRange => RejectionCode::OutOfRange,
        }
    }

    impl Guest for Component {
        fn version() -> String {
            VERSION.to_string()
        }

        fn validate(payloads: Vec<u8>, ends: Vec<u32>, minor_digits: u8) -> BatchResult {
            install_panic_hook();
            // Packing that breaks the contract panics: a trap, whose message reaches the log.
            let r = rules::validate_batch(&payloads, &ends, minor_digits);
            BatchResult {
                sales: r
                    .sales
                    .into_iter()
                    .map(|s| Sale {
                        index: s.index,
                        store: s.store,
                        amount_minor: s.amount_minor,
                        event_time: s.event_time,
                    })
                    .collect(),
                rejections: r
                    .rejections
                    .into_iter()
                    .map(|r| Rejected {
                        index: r.index,
                        rejection: Rejection {
                            code: code(r.rejection.code),
                            field: r.rejection.field.map(str::to_owned),
                            detail: r.rejection.detail,
                        },
                    })
                    .collect(),
            }
        }
    }
}
