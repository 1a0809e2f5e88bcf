#!/usr/bin/env python3
"""NaCl box cross-check for coder-tailnet's DERP handshake, using PyNaCl
(libsodium) as the independent implementation.

Driven by tailnet/tests/derp_nacl_pynacl.rs. Reads one JSON object on stdin:

  a_secret, a_public, b_secret, b_public   hex X25519 keys (A = client, B = server)
  sealed_a_to_b                            hex nonce(24)|box, sealed by Rust from A to B
  plaintext                                hex, what sealed_a_to_b must open to
  client_info_frame                        hex, a whole DERP ClientInfo frame a Rust
                                           client sent to server key B
  reply_plaintext                          hex, to seal from B to A

Checks key derivation, opens both boxes, parses the frame layout
(type 0x02 | u32 BE length | client key(32) | nonce(24) | box), and writes
one JSON object on stdout:

  client_info_json    the JSON object found inside the ClientInfo box
  sealed_b_to_a       hex nonce|box of reply_plaintext from B to A
  server_info_frame   hex DERP ServerInfo frame (0x03 | len | nonce | box of
                      {"version": 2}) sealed from B to A

Exits non-zero with a message on stderr on any mismatch.
"""
import json
import struct
import sys

from nacl.public import Box, PrivateKey, PublicKey
from nacl.utils import random


def fail(msg):
    sys.stderr.write("nacl_check: " + msg + "\n")
    sys.exit(1)


def main():
    req = json.load(sys.stdin)
    h = bytes.fromhex
    a_sk, b_sk = PrivateKey(h(req["a_secret"])), PrivateKey(h(req["b_secret"]))
    a_pk, b_pk = PublicKey(h(req["a_public"])), PublicKey(h(req["b_public"]))
    if bytes(a_sk.public_key) != bytes(a_pk):
        fail("public key of A differs from libsodium's derivation")
    if bytes(b_sk.public_key) != bytes(b_pk):
        fail("public key of B differs from libsodium's derivation")

    # B opens what Rust sealed from A.
    box_b = Box(b_sk, a_pk)
    sealed = h(req["sealed_a_to_b"])
    opened = box_b.decrypt(sealed[24:], sealed[:24])
    if opened != h(req["plaintext"]):
        fail("opened plaintext differs")

    # The ClientInfo frame, parsed by layout.
    frame = h(req["client_info_frame"])
    if len(frame) < 5 or frame[0] != 0x02:
        fail("not a ClientInfo frame (type %r)" % frame[:1])
    (length,) = struct.unpack(">I", frame[1:5])
    body = frame[5:]
    if length != len(body):
        fail("frame length %d != body %d" % (length, len(body)))
    if body[:32] != bytes(a_pk):
        fail("ClientInfo key is not the client's public key")
    nonce, boxed = body[32:56], body[56:]
    info = json.loads(box_b.decrypt(boxed, nonce))

    # B seals back to A.
    box_to_a = Box(b_sk, a_pk)
    n1 = random(Box.NONCE_SIZE)
    reply = box_to_a.encrypt(h(req["reply_plaintext"]), n1)
    n2 = random(Box.NONCE_SIZE)
    si = box_to_a.encrypt(json.dumps({"version": 2}).encode(), n2)
    si_body = bytes(si.nonce) + bytes(si.ciphertext)
    si_frame = bytes([0x03]) + struct.pack(">I", len(si_body)) + si_body

    json.dump(
        {
            "client_info_json": info,
            "sealed_b_to_a": (bytes(reply.nonce) + bytes(reply.ciphertext)).hex(),
            "server_info_frame": si_frame.hex(),
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
