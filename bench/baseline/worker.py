#!/usr/bin/env python3
"""The seed stack's server worker, for the side-by-side benchmark.

Written to ../shared/reference/architecture-v1.md, "Chunk Reassembly (Server-Side)":
a paho-mqtt client on the broker (Mosquitto) keeps

    image_chunks = {'device_id|image_name': {'max_chunks': N, 'chunks': {id: bytes},
                                             'received_count': n}}

the first message with `total_chunks_count` creates the entry, each chunk is
added to the dict, when len(chunks) == max_chunks the image is reassembled
(b''.join(chunks[i] for i in sorted(chunks))), saved as `{timestamp}_{image_name}`,
the entry cleared, and ACK_OK published. Plus what the workload needs to run:
HELLO -> capture_image, METADATA -> send_image, and a missing_chunks request
when an entry has been quiet for --quiet-gap-ms (the document's timeout).

Usage: worker.py --host 127.0.0.1 --port PORT --out DIR [--quiet-gap-ms 2000]
Prints "worker ready" once subscribed.
"""
import argparse
import base64
import json
import os
import sys
import threading
import time

import paho.mqtt.client as mqtt

image_chunks = {}
lock = threading.Lock()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quiet-gap-ms", type=int, default=2000)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="seed-worker")
    client.max_inflight_messages_set(100)

    def publish(dev, channel, obj):
        client.publish(f"ESP32CAM/{dev}/{channel}", json.dumps(obj), qos=1)

    def on_connect(c, userdata, flags, reason_code, properties):
        c.subscribe([("ESP32CAM/+/status", 1), ("ESP32CAM/+/data", 1)])

    def on_subscribe(c, userdata, mid, reason_codes, properties):
        print("worker ready", flush=True)

    def on_message(c, userdata, msg):
        parts = msg.topic.split("/")
        if len(parts) != 3:
            return
        dev, channel = parts[1], parts[2]
        try:
            data = json.loads(msg.payload)
        except ValueError:
            return
        if channel == "status":
            publish(dev, "cmd", {"device_id": dev, "capture_image": True})
            return
        if "total_chunks_count" in data:
            key = f"{dev}|{data['image_name']}"
            with lock:
                image_chunks[key] = {
                    "max_chunks": int(data["total_chunks_count"]),
                    "chunks": {},
                    "received_count": 0,
                    "timestamp": data.get("capture_timestamp", ""),
                    "last": time.monotonic(),
                }
            publish(dev, "cmd", {"device_id": dev, "send_image": data["image_name"]})
            return
        if "chunk_id" in data:
            key = f"{dev}|{data['image_name']}"
            p = data["payload"]
            try:
                chunk = base64.b64decode(p, validate=True) if isinstance(p, str) else bytes(p)
            except (ValueError, TypeError):
                return  # invalid chunks are not added: treated as missing
            with lock:
                entry = image_chunks.get(key)
                if entry is None:
                    return
                entry["chunks"][int(data["chunk_id"])] = chunk
                entry["received_count"] = len(entry["chunks"])
                entry["last"] = time.monotonic()
                if entry["received_count"] != entry["max_chunks"]:
                    return
                del image_chunks[key]
            chunks = entry["chunks"]
            merged_bytes = b"".join(chunks[i] for i in sorted(chunks))
            name = f"{entry['timestamp']}_{data['image_name']}".replace("/", "_")
            with open(os.path.join(args.out, name), "wb") as f:
                f.write(merged_bytes)
            publish(dev, "ack", {"device_id": dev, "image_name": data["image_name"],
                                 "ACK_OK": {"next_wake_time": "5:30PM"}})

    def sweeper():
        gap = args.quiet_gap_ms / 1000.0
        while True:
            time.sleep(0.1)
            now = time.monotonic()
            with lock:
                stale = [(k, e) for k, e in image_chunks.items() if now - e["last"] > gap]
                for k, e in stale:
                    e["last"] = now
            for k, e in stale:
                dev, name = k.split("|", 1)
                base = 1
                missing = [i for i in range(base, base + e["max_chunks"]) if i not in e["chunks"]]
                publish(dev, "cmd", {"device_id": dev, "image_name": name, "missing_chunks": missing})

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(args.host, args.port, keepalive=60)
    threading.Thread(target=sweeper, daemon=True).start()
    client.loop_forever()


if __name__ == "__main__":
    sys.exit(main())
