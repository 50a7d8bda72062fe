/*
 * FD PASS: passing descriptors between two bbal processes, and telling
 * systemd about a new main process (fd_pass.c).  Built into the same addon
 * as udp_batch.c, which calls fp_init() from its module init.
 */
#ifndef BBAL_FD_PASS_H
#define BBAL_FD_PASS_H

#include <node_api.h>

/* Add the functions to the addon's exports; 0, or -1 with an exception pending. */
int fp_init(napi_env env, napi_value exports);

#endif
