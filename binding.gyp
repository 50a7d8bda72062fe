# The native addons.
#
# udp_batch (native/udp_batch.c): the UDP transport, Linux only, because it
# needs recvmmsg() and sendmmsg(); elsewhere, or when it is missing or fails
# to load, bbal uses Node's dgram.
#
# fd_pass (native/fd_pass.c): passing the listening sockets to a bbal that
# takes over, and notifying systemd; any Unix (illumos too).  Without it a
# takeover is refused with one line saying so.
#
# Both are built by `npm install` (the "install" script).
{
  "targets": [
    {
      "target_name": "udp_batch",
      "sources": ["native/udp_batch.c"],
      "cflags": ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "defines": ["NAPI_VERSION=8"],
      "conditions": [
        ["OS!='linux'", { "type": "none", "sources": [] }]
      ]
    },
    {
      "target_name": "fd_pass",
      "sources": ["native/fd_pass.c"],
      "cflags": ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "defines": ["NAPI_VERSION=8"],
      "conditions": [
        ["OS=='win'", { "type": "none", "sources": [] }]
      ]
    }
  ]
}
