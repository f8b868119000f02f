//! Who may connect and what they may do: mutual TLS and the certificate identity, the
//! ACL, the development PKI, the reasons a connection is refused, and the policy in
//! force (swapped whole on reload).

pub mod acl;
pub mod pki;
pub(crate) mod policy;
pub(crate) mod refusal;
pub(crate) mod tls;
