//! KeyPackage management: keep [`ClientConfig::key_package_target`] ordinary KeyPackages and
//! one last-resort KeyPackage uploaded.
//!
//! The private keys of new KeyPackages are committed to the profile database before the
//! KeyPackages are uploaded, so a Welcome can always be opened.
//!
//! [`ClientConfig::key_package_target`]: crate::ClientConfig::key_package_target

use roost_protocol::Opaque;
use roost_protocol::messages::keypackage::{KeyPackageCountRequest, UploadKeyPackagesRequest};

use super::Inner;
use crate::error::ClientError;
use crate::store::Changes;

/// Most KeyPackages per upload (the server's default limit).
const MAX_PER_UPLOAD: u32 = 100;

impl Inner {
    /// Tops up the uploaded KeyPackages if they fell below the low-water mark, and uploads a
    /// last-resort KeyPackage if the server holds none.
    pub(crate) async fn ensure_key_packages(&self) -> Result<(), ClientError> {
        let _serialised = self.key_package_lock.lock().await;
        let count = self.conn.call(KeyPackageCountRequest {}).await?;
        let target = self.config.key_package_target;
        let missing = if count.remaining < self.config.key_package_low_water.min(target) {
            target.saturating_sub(count.remaining)
        } else {
            0
        };
        let mut need_last_resort = count.has_last_resort == 0;
        let mut missing = missing;
        while missing > 0 || need_last_resort {
            let batch = missing.min(MAX_PER_UPLOAD);
            let (ordinary, last_resort) = {
                let mls = self.state.lock().await;
                let made = self.mls_op(&mls, |mls| {
                    mls.new_key_packages(&self.identity, batch as usize, need_last_resort)
                })?;
                self.commit(&mls, Changes::default())?;
                made
            };
            let uploaded = self
                .conn
                .call(UploadKeyPackagesRequest {
                    key_packages: ordinary.into_iter().map(Opaque::new).collect(),
                    last_resort: last_resort.map(Opaque::new),
                })
                .await?;
            tracing::debug!(remaining = uploaded.remaining, "uploaded KeyPackages");
            missing -= batch;
            need_last_resort = false;
        }
        Ok(())
    }
}

impl super::Client {
    /// How many ordinary KeyPackages the server holds for this client, and whether it holds
    /// a last-resort one.
    pub async fn key_packages_remaining(&self) -> Result<(u32, bool), ClientError> {
        let count = self.inner.conn.call(KeyPackageCountRequest {}).await?;
        Ok((count.remaining, count.has_last_resort == 1))
    }
}
