//! The route table: how a service's [`Handler`](crate::Handler) picks the
//! code that serves a method, keyed by the catalogue's `&'static Method`
//! constants ([`crate::catalog::methods`]), never by name.
//!
//! Each service builds one [`Routes`] for its [`ServiceId`] and looks every
//! call up in it. A route is whatever the service calls (a function
//! pointer, usually); the table only decides which one, and keeps three
//! promises:
//!
//! - **Built right or not at all.** Registering a method of another
//!   service, a method twice, or a stream as unary (or the reverse) is a
//!   [`RouteError`], so a table that exists has one route per method it
//!   names, each of the right kind.
//! - **Unknown methods get the one answer.** A method without a route is
//!   `Unimplemented` ("`vm/create` is not served by the Vm service"), the
//!   same for every service.
//! - **Coverage is checkable.** [`Routes::missing`] names the catalogue's
//!   methods of the service (unary and streaming) that have no route; each
//!   product service's tests assert it is empty, so a method added to the
//!   catalogue without a route fails its service's tests.

use std::collections::BTreeMap;

use crate::catalog::{Method, ServiceId};
use crate::status::Status;

/// Why a route could not be registered: a mistake in the table's code,
/// found when it is built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The method belongs to another service.
    #[error(
        "{method} belongs to the {owner} service, not to the {table} service this table routes; \
         register it in the {owner} service's table"
    )]
    OtherService {
        /// The method's label.
        method: String,
        /// The service it belongs to.
        owner: ServiceId,
        /// The service of the table.
        table: ServiceId,
    },
    /// The method has a route already.
    #[error("{method} has a route already; register each method once")]
    Duplicate {
        /// The method's label.
        method: String,
    },
    /// A stream registered as unary, or a unary method as a stream.
    #[error("{method} is {actual}; register it with `{use_instead}`")]
    WrongKind {
        /// The method's label.
        method: String,
        /// "a stream" or "unary".
        actual: &'static str,
        /// The registering function to use.
        use_instead: &'static str,
    },
}

/// One service's routes: `U` for unary methods, `S` for streams (`()`
/// when the service serves none).
pub struct Routes<U, S = ()> {
    service: ServiceId,
    unary: BTreeMap<u16, U>,
    streams: BTreeMap<u16, S>,
}

impl<U, S> std::fmt::Debug for Routes<U, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes")
            .field("service", &self.service)
            .field("unary", &self.unary.keys().collect::<Vec<_>>())
            .field("streams", &self.streams.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl<U, S> Routes<U, S> {
    /// An empty table for `service`: every method is `Unimplemented`.
    pub fn new(service: ServiceId) -> Routes<U, S> {
        Routes {
            service,
            unary: BTreeMap::new(),
            streams: BTreeMap::new(),
        }
    }

    /// The service this table routes.
    pub fn service(&self) -> ServiceId {
        self.service
    }

    /// Routes the unary `method` to `route`.
    pub fn unary(mut self, method: &'static Method, route: U) -> Result<Self, RouteError> {
        self.check(method, false)?;
        self.unary.insert(method.id, route);
        Ok(self)
    }

    /// Routes the streaming `method` to `route`.
    pub fn stream(mut self, method: &'static Method, route: S) -> Result<Self, RouteError> {
        self.check(method, true)?;
        self.streams.insert(method.id, route);
        Ok(self)
    }

    fn check(&self, method: &'static Method, stream: bool) -> Result<(), RouteError> {
        if method.service != self.service {
            return Err(RouteError::OtherService {
                method: method.label(),
                owner: method.service,
                table: self.service,
            });
        }
        if method.kind.is_stream() != stream {
            let (actual, use_instead) = if method.kind.is_stream() {
                ("a stream", "stream")
            } else {
                ("unary", "unary")
            };
            return Err(RouteError::WrongKind {
                method: method.label(),
                actual,
                use_instead,
            });
        }
        if self.unary.contains_key(&method.id) || self.streams.contains_key(&method.id) {
            return Err(RouteError::Duplicate {
                method: method.label(),
            });
        }
        Ok(())
    }

    /// The route of the unary `method`, or `Unimplemented` when it has
    /// none (another service's method included).
    pub fn route(&self, method: &'static Method) -> Result<&U, Status> {
        self.unary
            .get(&method.id)
            .filter(|_| method.service == self.service && !method.kind.is_stream())
            .ok_or_else(|| self.not_served(method, ""))
    }

    /// The route of the streaming `method`, or `Unimplemented` when it
    /// has none.
    pub fn stream_route(&self, method: &'static Method) -> Result<&S, Status> {
        self.streams
            .get(&method.id)
            .filter(|_| method.service == self.service && method.kind.is_stream())
            .ok_or_else(|| self.not_served(method, " as a stream"))
    }

    /// The typed unknown-method answer: `Unimplemented`, naming the
    /// method and this service.
    fn not_served(&self, method: &Method, how: &str) -> Status {
        Status::unimplemented(format!(
            "{} is not served{how} by the {} service",
            method.label(),
            self.service.proto_name()
        ))
    }

    /// The catalogue's methods of this service (unary and streaming) that
    /// have no route.
    pub fn missing(&self) -> Vec<&'static Method> {
        self.service
            .methods()
            .filter(|m| {
                let routed = if m.kind.is_stream() {
                    self.streams.contains_key(&m.id)
                } else {
                    self.unary.contains_key(&m.id)
                };
                !routed
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::methods;
    use crate::status::Code;

    type Table = Routes<&'static str, &'static str>;

    #[test]
    fn a_method_of_another_service_is_refused() {
        let err = Table::new(ServiceId::Vm)
            .unary(methods::STATUS_GET, "status")
            .unwrap_err();
        assert_eq!(
            err,
            RouteError::OtherService {
                method: "status/get".into(),
                owner: ServiceId::Status,
                table: ServiceId::Vm,
            }
        );
        assert!(
            err.to_string().contains("register it in the status"),
            "{err}"
        );
    }

    #[test]
    fn a_method_routed_twice_is_refused() {
        let err = Table::new(ServiceId::Vm)
            .unary(methods::VM_GET, "first")
            .and_then(|t| t.unary(methods::VM_GET, "second"))
            .unwrap_err();
        assert_eq!(
            err,
            RouteError::Duplicate {
                method: "vm/get".into()
            }
        );
        let err = Table::new(ServiceId::Vm)
            .stream(methods::VM_WATCH, "first")
            .and_then(|t| t.stream(methods::VM_WATCH, "second"))
            .unwrap_err();
        assert!(matches!(err, RouteError::Duplicate { .. }), "{err}");
    }

    #[test]
    fn a_method_of_the_wrong_kind_is_refused() {
        let err = Table::new(ServiceId::Vm)
            .unary(methods::VM_WATCH, "watch")
            .unwrap_err();
        assert!(
            matches!(
                err,
                RouteError::WrongKind {
                    use_instead: "stream",
                    ..
                }
            ),
            "{err}"
        );
        let err = Table::new(ServiceId::Vm)
            .stream(methods::VM_GET, "get")
            .unwrap_err();
        assert!(
            matches!(
                err,
                RouteError::WrongKind {
                    use_instead: "unary",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn lookups_answer_the_route_or_unimplemented() {
        let table = Table::new(ServiceId::Vm)
            .unary(methods::VM_GET, "get")
            .and_then(|t| t.stream(methods::VM_WATCH, "watch"))
            .unwrap();
        assert_eq!(table.route(methods::VM_GET), Ok(&"get"));
        assert_eq!(table.stream_route(methods::VM_WATCH), Ok(&"watch"));
        let err = table.route(methods::VM_CREATE).unwrap_err();
        assert_eq!(err.code, Code::Unimplemented);
        assert_eq!(err.message, "vm/create is not served by the Vm service");
        // Another service's method with the same id is not this route.
        assert_eq!(methods::STATUS_GET.id, methods::VM_CREATE.id);
        let err = table.route(methods::STATUS_GET).unwrap_err();
        assert_eq!(err.code, Code::Unimplemented);
        // A unary method asked for as a stream, and the reverse.
        let err = table.stream_route(methods::VM_GET).unwrap_err();
        assert_eq!(err.code, Code::Unimplemented);
        assert!(err.message.contains("as a stream"), "{}", err.message);
        assert_eq!(
            table.route(methods::VM_WATCH).unwrap_err().code,
            Code::Unimplemented
        );
    }

    #[test]
    fn missing_names_every_catalogue_method_without_a_route() {
        let table = Table::new(ServiceId::Vm)
            .unary(methods::VM_GET, "get")
            .unwrap();
        let missing: Vec<&str> = table.missing().iter().map(|m| m.name).collect();
        assert_eq!(
            missing,
            [
                "Create", "Start", "Stop", "Delete", "List", "Migrate", "Watch"
            ]
        );
        let mut full = Table::new(ServiceId::Vm);
        for m in ServiceId::Vm.methods() {
            full = if m.kind.is_stream() {
                full.stream(m, "s")
            } else {
                full.unary(m, "u")
            }
            .unwrap();
        }
        assert!(full.missing().is_empty());
    }
}
