//! Everything the server does with openmls, behind non-generic functions (each binary that
//! instantiates openmls generics pays for it in build time): KeyPackage validation for the
//! KeyPackage service, and the public group state of the Delivery Service with its persisted
//! form (a versioned snapshot of openmls's own stored state).

mod group;
mod keypackage;
mod snapshot;

pub(crate) use group::{CommitOutcome, DsGroup, Member, MlsError};
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use keypackage::key_package_lifetime;
pub(crate) use keypackage::{CIPHERSUITE, KeyPackagePolicy, validate_key_package};
