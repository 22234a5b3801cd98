//! openraft's own storage test suite, run against the sled log store and
//! the state machine, each test in a fresh temporary data directory.

use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};
use tempfile::TempDir;
use tern_store::{LogStore, StateMachineStore, TypeConfig};

struct TempStores;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for TempStores {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (log, sm) = tern_store::open(dir.path()).expect("stores open");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_openraft_storage_suite() {
    Suite::test_all(TempStores).await.expect("storage suite");
}
