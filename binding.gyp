# The native addon: the UDP transport (native/udp_batch.c) and descriptor
# passing for takeovers (native/fd_pass.c).  Linux only, because it
# needs recvmmsg() and sendmmsg().  Built by `npm install` (the "install"
# script); when it is missing or fails to load, bbal uses Node's dgram.
{
  "targets": [
    {
      "target_name": "udp_batch",
      "sources": ["native/udp_batch.c", "native/fd_pass.c"],
      "cflags": ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "defines": ["NAPI_VERSION=8"],
      "conditions": [
        ["OS!='linux'", { "type": "none", "sources": [] }]
      ]
    }
  ]
}
