//! Everything the server does with openmls, behind non-generic functions (each binary that
//! instantiates openmls generics pays for it in build time): KeyPackage validation for the
//! KeyPackage service and the public group state of the Delivery Service.

// Until the Delivery Service calls into it, parts of the group engine are only used by its tests.
#[cfg_attr(not(test), allow(dead_code))]
mod group;
mod keypackage;

#[allow(unused_imports)]
pub(crate) use group::{
    CommitOutcome, DsGroup, Member, MessageInfo, MessageKind, MlsError, inspect,
};
pub(crate) use keypackage::{CIPHERSUITE, KeyPackagePolicy, validate_key_package};
