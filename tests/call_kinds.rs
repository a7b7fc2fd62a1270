//! The four call kinds pass through intact: every message, the headers, the
//! trailers and the status; each stream stays on one endpoint.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use agentmesh::pb::InvokeRequest;
use support::*;
use tokio_stream::StreamExt;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_echoes_payload_and_headers() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(3).await;
        let sidecar = sidecar(vec![planner(&agents.addrs)]).await;
        for way in WAYS {
            let mut client = planner_client(way, &sidecar).await;
            for size in [0, 1, 64 * 1024, 1024 * 1024] {
                let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
                let mut req = tonic::Request::new(request(&payload));
                req.metadata_mut()
                    .insert("x-echo", "hello-through-the-mesh".parse().unwrap());
                let reply = client.invoke(req).await.expect("unary call");
                assert_eq!(
                    reply.metadata().get("x-echo").unwrap(),
                    "hello-through-the-mesh"
                );
                assert_eq!(
                    reply.into_inner().payload,
                    payload,
                    "{way:?}: {size}-byte payload"
                );
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_streams_keep_every_message_in_order_on_one_endpoint() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(3).await;
        let sidecar = sidecar(vec![planner(&agents.addrs)]).await;
        for way in WAYS {
            let mut client = planner_client(way, &sidecar).await;
            let mut used = BTreeSet::new();
            for _ in 0..6 {
                let req = InvokeRequest {
                    count: 50,
                    payload: vec![7; 100],
                    ..Default::default()
                };
                let replies: Vec<_> = client
                    .stream(req)
                    .await
                    .unwrap()
                    .into_inner()
                    .collect::<Result<_, _>>()
                    .await
                    .unwrap();
                assert_eq!(replies.len(), 50, "{way:?}");
                let seqs: Vec<u32> = replies.iter().map(|r| r.seq).collect();
                assert_eq!(seqs, (0..50).collect::<Vec<_>>());
                let agents: BTreeSet<_> = replies.iter().map(|r| r.agent.clone()).collect();
                assert_eq!(
                    agents.len(),
                    1,
                    "{way:?}: one stream spread over {agents:?}"
                );
                used.extend(agents);
            }
            assert_eq!(used.len(), 3, "{way:?}: streams are balanced too: {used:?}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_fails_after_messages_keeps_messages_status_and_trailers() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(3).await;
        let sidecar = sidecar(vec![planner(&agents.addrs)]).await;
        for way in WAYS {
            let mut client = planner_client(way, &sidecar).await;
            let req = InvokeRequest {
                count: 5,
                fail_code: Code::ResourceExhausted as i32,
                fail_message: "quota gone: 5/5 used".into(),
                ..Default::default()
            };
            let mut stream = client.stream(req).await.unwrap().into_inner();
            let mut got = 0;
            let status = loop {
                match stream.next().await {
                    Some(Ok(_)) => got += 1,
                    Some(Err(status)) => break status,
                    None => panic!("{way:?}: stream ended without the failure"),
                }
            };
            assert_eq!(got, 5, "{way:?}");
            assert_eq!(status.code(), Code::ResourceExhausted);
            assert_eq!(status.message(), "quota gone: 5/5 used");
            let agent = status
                .metadata()
                .get("x-agent")
                .expect("the agent's trailer arrives");
            assert!(agent.to_str().unwrap().starts_with("agent-"));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_streams_deliver_every_request() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(3).await;
        let sidecar = sidecar(vec![planner(&agents.addrs)]).await;
        for way in WAYS {
            let mut client = planner_client(way, &sidecar).await;
            let requests =
                tokio_stream::iter((0..200).map(|i| request(format!("part {i}").as_bytes())));
            let reply = client
                .collect(requests)
                .await
                .expect("client stream")
                .into_inner();
            assert_eq!(reply.seq, 200, "{way:?}: requests received");
            assert_eq!(reply.payload, b"part 199");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidirectional_streams_answer_each_request_in_turn_on_one_endpoint() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(3).await;
        let sidecar = sidecar(vec![planner(&agents.addrs)]).await;
        for way in WAYS {
            let mut client = planner_client(way, &sidecar).await;
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let mut replies = client
                .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let mut agent = None;
            // Lock-step: each reply comes before the next request is sent.
            for i in 0..30u32 {
                tx.send(request(format!("turn {i}").as_bytes()))
                    .await
                    .unwrap();
                let reply = replies.next().await.expect("a reply per request").unwrap();
                assert_eq!(reply.seq, i);
                assert_eq!(reply.payload, format!("turn {i}").as_bytes());
                assert_eq!(
                    agent.get_or_insert(reply.agent.clone()),
                    &reply.agent,
                    "{way:?}: one endpoint per stream"
                );
            }
            drop(tx);
            assert!(
                replies.next().await.is_none(),
                "{way:?}: the stream ends with OK"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_from_the_agent_arrive_unchanged() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(3).await;
        let sidecar = sidecar(vec![planner(&agents.addrs)]).await;
        let cases = [
            (Code::NotFound, "no plan named \"x\""),
            (Code::Internal, "tool crashed: exit 3 (ünïcode ok)"),
            (Code::PermissionDenied, ""),
            (Code::Unavailable, "agent busy"),
        ];
        for way in WAYS {
            let mut client = planner_client(way, &sidecar).await;
            for (code, message) in cases {
                let req = InvokeRequest {
                    fail_code: code as i32,
                    fail_message: message.into(),
                    ..Default::default()
                };
                let status = client
                    .invoke(req)
                    .await
                    .expect_err("the agent fails this call");
                assert_eq!(status.code(), code, "{way:?}");
                assert_eq!(status.message(), message, "{way:?}");
                assert!(
                    status.metadata().get("x-agent").is_some(),
                    "{way:?}: trailers pass"
                );
            }
        }
    })
    .await;
}
