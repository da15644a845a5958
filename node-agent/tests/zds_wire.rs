//! ZDS wire compatibility: every message encoded and decoded against byte
//! vectors written by hand from the field numbers of upstream's
//! `istio.workload.zds` (see shared/reference/zds.md), so a wrong field
//! number or type in proto/zds.proto fails here.

use mesh_proto::zds::{
    Ack, AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version, WorkloadInfo,
    WorkloadRequest, WorkloadResponse, ZdsHello, workload_request, workload_response,
};
use prost::Message;

fn info() -> WorkloadInfo {
    WorkloadInfo {
        name: "n".into(),
        namespace: "ns".into(),
        service_account: "sa".into(),
    }
}

/// WorkloadInfo: name=1 "n", namespace=2 "ns", service_account=3 "sa".
const INFO: &[u8] = &[
    0x0a, 0x01, b'n', 0x12, 0x02, b'n', b's', 0x1a, 0x02, b's', b'a',
];

fn check<M: Message + Default + PartialEq + std::fmt::Debug>(msg: M, bytes: &[u8]) {
    assert_eq!(msg.encode_to_vec(), bytes, "encoding {msg:?}");
    assert_eq!(M::decode(bytes).unwrap(), msg, "decoding {bytes:02x?}");
}

#[test]
fn hello() {
    // version = 1 (varint), V1 = 1
    check(
        ZdsHello {
            version: Version::V1 as i32,
        },
        &[0x08, 0x01],
    );
    assert_eq!(Version::NotUsed as i32, 0);
    // NOT_USED is the proto3 default: encodes to nothing
    check(ZdsHello { version: 0 }, &[]);
}

#[test]
fn workload_info() {
    check(info(), INFO);
    // field 4 (trust_domain upstream) is reserved: a peer sending it is
    // decoded without error and the field ignored.
    let mut with_td = INFO.to_vec();
    with_td.extend_from_slice(&[0x22, 0x02, b't', b'd']);
    assert_eq!(WorkloadInfo::decode(with_td.as_slice()).unwrap(), info());
}

#[test]
fn add_workload() {
    // WorkloadRequest.add = 1 { uid = 1 "u", workload_info = 2 {INFO} }
    let mut add = vec![0x0a, 0x01, b'u', 0x12, INFO.len() as u8];
    add.extend_from_slice(INFO);
    let mut bytes = vec![0x0a, add.len() as u8];
    bytes.extend_from_slice(&add);
    check(
        WorkloadRequest {
            payload: Some(workload_request::Payload::Add(AddWorkload {
                uid: "u".into(),
                workload_info: Some(info()),
            })),
        },
        &bytes,
    );
}

#[test]
fn keep_workload() {
    // WorkloadRequest.keep = 5 { uid = 1 "u" }
    check(
        WorkloadRequest {
            payload: Some(workload_request::Payload::Keep(KeepWorkload {
                uid: "u".into(),
            })),
        },
        &[0x2a, 0x03, 0x0a, 0x01, b'u'],
    );
}

#[test]
fn del_workload() {
    // WorkloadRequest.del = 2 { uid = 2 "u" }  (DelWorkload's uid is field 2)
    check(
        WorkloadRequest {
            payload: Some(workload_request::Payload::Del(DelWorkload {
                uid: "u".into(),
            })),
        },
        &[0x12, 0x03, 0x12, 0x01, b'u'],
    );
}

#[test]
fn snapshot_sent() {
    // WorkloadRequest.snapshot_sent = 3 {}
    check(
        WorkloadRequest {
            payload: Some(workload_request::Payload::SnapshotSent(SnapshotSent {})),
        },
        &[0x1a, 0x00],
    );
}

#[test]
fn field_4_of_workload_request_is_unused() {
    // Upstream once had no_snapshot_present = 4; it must not decode as any
    // of our payloads.
    let req = WorkloadRequest::decode(&[0x22u8, 0x00][..]).unwrap();
    assert_eq!(req.payload, None);
}

#[test]
fn ack_and_nack() {
    // WorkloadResponse.ack = 1 { error = 1 }
    check(
        WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack {
                error: String::new(),
            })),
        },
        &[0x0a, 0x00],
    );
    check(
        WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack { error: "x".into() })),
        },
        &[0x0a, 0x03, 0x0a, 0x01, b'x'],
    );
}
