//! External commits for the DS tests.

use openmls::prelude::{
    BasicCredential, CredentialWithKey, MIXED_PLAINTEXT_WIRE_FORMAT_POLICY, MlsGroup,
    MlsGroupJoinConfig, MlsMessageBodyIn, MlsMessageIn, MlsMessageOut, OpenMlsProvider,
    RatchetTreeIn,
    tls_codec::{Deserialize as _, Serialize as _},
};

use crate::mls_member::{Bundle, Member};

/// Joins (or rejoins) by external commit from the DS's GroupInfo and tree.
pub fn external_commit(member: &mut Member, group_info: &[u8], tree: &[u8]) -> Bundle {
    let MlsMessageBodyIn::GroupInfo(group_info) = MlsMessageIn::tls_deserialize_exact(group_info)
        .unwrap()
        .extract()
    else {
        panic!("not a GroupInfo");
    };
    let tree = RatchetTreeIn::tls_deserialize_exact(tree).unwrap();
    let credential = CredentialWithKey {
        credential: BasicCredential::new(member.client.id.tls_serialize_detached().unwrap()).into(),
        signature_key: member.client.key.public().into(),
    };
    let config = MlsGroupJoinConfig::builder()
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .build();
    let provider = &member.provider;
    let (group, bundle) = MlsGroup::external_commit_builder()
        .with_ratchet_tree(tree)
        .with_config(config)
        .build_group(provider, group_info, credential)
        .unwrap()
        .load_psks(provider.storage())
        .unwrap()
        .create_group_info(true)
        .build(
            provider.rand(),
            provider.crypto(),
            &member.client.key,
            |_| true,
        )
        .unwrap()
        .finalize(provider)
        .unwrap();
    let (commit, _, group_info) = bundle.into_contents();
    member.group = Some(group);
    Bundle {
        commit: commit.tls_serialize_detached().unwrap(),
        welcome: None,
        group_info: MlsMessageOut::from(group_info.unwrap())
            .tls_serialize_detached()
            .unwrap(),
    }
}
