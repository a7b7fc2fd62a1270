//! Deadlines (`grpc-timeout`) and cancellation reach the endpoint: the
//! caller gets DEADLINE_EXCEEDED from the proxy and the upstream stream is
//! reset, so the agent stops working on a call nobody waits for.

mod support;

use std::time::{Duration, Instant};

use agentmesh::pb::InvokeRequest;
use support::*;
use tokio_stream::StreamExt;
use tonic::Code;

const SOON: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_mid_stream_ends_the_call_and_resets_the_upstream_stream() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(1).await;
        let sidecar = sidecar(vec![planner(&agents.addrs)]).await;
        for way in WAYS {
            let before = agents.cancelled(0);
            let mut client = planner_client(way, &sidecar).await;
            // 50 replies 100 ms apart would take 5 s; the deadline is 500 ms.
            let mut req = tonic::Request::new(InvokeRequest {
                count: 50,
                interval_ms: 100,
                ..Default::default()
            });
            req.set_timeout(Duration::from_millis(500));
            let started = Instant::now();
            let mut stream = client.stream(req).await.unwrap().into_inner();
            let mut got = 0;
            let status = loop {
                match stream.next().await {
                    Some(Ok(_)) => got += 1,
                    Some(Err(status)) => break status,
                    None => panic!("{way:?}: the stream ended OK past its deadline"),
                }
            };
            let took = started.elapsed();
            assert_eq!(status.code(), Code::DeadlineExceeded, "{way:?}: {status:?}");
            assert!(
                status
                    .message()
                    .starts_with("agentmesh: cluster \"planner.agents\": deadline of 500ms"),
                "{}",
                status.message()
            );
            assert!(
                (3..=7).contains(&got),
                "{way:?}: {got} replies before the deadline"
            );
            assert!(took < Duration::from_millis(900), "{way:?}: took {took:?}");
            assert!(
                eventually(SOON, || agents.cancelled(0) > before).await,
                "{way:?}: the agent's stream was not reset"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_before_the_answer_gives_deadline_exceeded_and_cancels_the_agent() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(1).await;
        let sidecar = sidecar(vec![planner(&agents.addrs)]).await;
        for way in WAYS {
            let before = agents.cancelled(0);
            let slow = InvokeRequest {
                delay_ms: 5_000,
                ..Default::default()
            };
            let started = Instant::now();
            let status = raw_unary(way, &sidecar, &slow, &[("grpc-timeout", "300m")]).await;
            let status = tonic::Status::from_header_map(&status).expect("a grpc-status");
            assert_eq!(status.code(), Code::DeadlineExceeded, "{way:?}: {status:?}");
            assert!(
                status.message().contains("waiting for 127.0.0.1:"),
                "{}",
                status.message()
            );
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(300) && took < Duration::from_secs(1),
                "{way:?}: took {took:?}"
            );
            assert!(
                eventually(SOON, || agents.cancelled(0) > before).await,
                "{way:?}: the agent kept working"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_in_a_bidi_stream_resets_upstream_while_the_caller_still_sends() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(1).await;
        let sidecar = sidecar(vec![planner(&agents.addrs)]).await;
        for way in WAYS {
            let before = agents.cancelled(0);
            let mut client = planner_client(way, &sidecar).await;
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            req.set_timeout(Duration::from_millis(400));
            tx.send(request(b"first")).await.unwrap();
            let mut replies = client.chat(req).await.unwrap().into_inner();
            assert_eq!(replies.next().await.unwrap().unwrap().payload, b"first");
            // Keep the request stream open (tx alive) and wait for the deadline.
            let status = replies
                .next()
                .await
                .expect("a status")
                .expect_err("deadline");
            assert_eq!(status.code(), Code::DeadlineExceeded, "{way:?}: {status:?}");
            assert!(
                status.message().contains("was responding"),
                "{}",
                status.message()
            );
            assert!(
                eventually(SOON, || agents.cancelled(0) > before).await,
                "{way:?}: the agent's stream was not reset"
            );
            drop(tx);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_resets_the_upstream_stream() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(1).await;
        let sidecar = sidecar(vec![planner(&agents.addrs)]).await;
        for way in WAYS {
            let mut client = planner_client(way, &sidecar).await;

            // A server stream, dropped after two replies.
            let before = agents.cancelled(0);
            let req = InvokeRequest {
                count: 100,
                interval_ms: 50,
                ..Default::default()
            };
            let mut stream = client.stream(req).await.unwrap().into_inner();
            stream.next().await.unwrap().unwrap();
            stream.next().await.unwrap().unwrap();
            drop(stream);
            assert!(
                eventually(SOON, || agents.cancelled(0) > before).await,
                "{way:?}: stream not reset"
            );

            // A unary call, abandoned while the agent works on it.
            let before = agents.cancelled(0);
            let slow = client.invoke(InvokeRequest {
                delay_ms: 5_000,
                ..Default::default()
            });
            assert!(
                tokio::time::timeout(Duration::from_millis(200), slow)
                    .await
                    .is_err()
            );
            assert!(
                eventually(SOON, || agents.cancelled(0) > before).await,
                "{way:?}: unary call not reset"
            );
        }
        // Nothing is left in flight on the sidecar's side either.
        let endpoint = &sidecar.router().clusters()[0].endpoints()[0];
        assert!(
            eventually(SOON, || endpoint.in_flight() == 0).await,
            "in flight: {}",
            endpoint.in_flight()
        );
    })
    .await;
}
