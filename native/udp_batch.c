/*
 * UDP BATCH
 *
 * bbal's UDP socket, owned in C so that datagrams cross the kernel boundary
 * in batches: one recvmmsg() fills up to UB_SLOTS receive slots, one
 * sendmmsg() sends every answer JavaScript queued during an event-loop
 * callback.  Node's dgram does one recvmsg() and one sendmsg() per datagram,
 * and builds a request object and an address string for each answer; at
 * tens of thousands of queries per second that is most of bbal's CPU.
 *
 * The data never travels as JavaScript objects.  Four ArrayBuffers, made by
 * JavaScript once and held here by reference for the life of the socket,
 * are the shared arenas:
 *
 *   recv data   UB_SLOTS slots of UB_SLOT_BYTES: slot i holds datagram i
 *   recv meta   UB_SLOTS x 4 uint32: true length, IPv4 source (host order),
 *               source port, local address the datagram was sent to (0
 *               unless bound to the wildcard address)
 *   send data,  the same shape, filled by JavaScript; send(h, n) sends
 *   send meta   slots 0..n-1 with one sendmmsg(), each from its local
 *               address when it has one
 *
 * A datagram longer than its slot is truncated in the slot, but recvmmsg()
 * is asked for MSG_TRUNC so that the length in the meta arena is the true
 * one: bbal counts and drops anything over 1500 bytes and must see it as
 * such.
 *
 * WILDCARD BINDS.  A socket bound to 0.0.0.0 receives what is sent to any
 * of the host's addresses, but a plain send leaves from whichever address
 * the kernel picks for the route back -- not necessarily the one the client
 * asked, and a client discards an answer from an address it did not query.
 * So a wildcard socket turns IP_PKTINFO on: each datagram read comes with
 * an in_pktinfo, whose ipi_spec_dst (the local address it was sent to;
 * for a broadcast, the interface's address) goes to JavaScript as the
 * fourth meta word, and an answer given a local address is sent with an
 * IP_PKTINFO control message setting ipi_spec_dst, which makes it the
 * source.  A socket bound to one address needs none of this and sets none
 * of it.  IPv4 only, as bbal is.
 *
 * The socket is watched with a uv_poll_t on Node's own loop.  When it is
 * readable we read up to UB_MAX_BATCHES batches (fewer if one comes back
 * short), calling JavaScript once per batch with the count.  The call goes
 * through napi_make_callback(), not napi_call_function(): it is what Node's
 * own handles do, and it runs process.nextTick() callbacks and microtasks
 * when the callback returns.  The transport flushes its queued answers on
 * nextTick, so the answers a batch produced leave before the next batch is
 * read.  Stopping after a few batches keeps one busy socket from starving
 * the backends' sockets; the poll is level-triggered, so whatever is left is
 * read on the next turn of the loop.
 *
 * Errors are never thrown after open(): a receive error is handed to the
 * batch callback as a negative libuv error code, a send failure is the
 * difference between what was asked and what send() returns (with the
 * errno kept for send_errno()).  Answers refused with EAGAIN or ENOBUFS are
 * dropped, not queued: UDP is lossy, and a queue here would only grow under
 * exactly the load that fills it.
 *
 * POLL ERRORS.  When poll() reports POLLERR, libuv stops the poll handle
 * and calls us with UV_EBADF: left there, the socket would never be read
 * again while the process lived on.  POLLERR on a UDP socket means a
 * pending socket error (sk_err) or something on the error queue; neither
 * makes the socket unusable, and libuv's own UDP handles simply read the
 * error and carry on.  So do we: the pending error is taken (SO_ERROR),
 * the error queue drained (at most UB_ERRQUEUE_DRAIN entries), the poll
 * started again, and JavaScript told (a negative code, not fatal).  A
 * socket that keeps failing is not re-armed for ever: after
 * UB_MAX_POLL_ERRORS errors with no datagram read in between, or if the
 * poll cannot be started again, JavaScript is told the error is fatal, and
 * bbal exits so that its service manager restarts it -- never a live
 * process whose UDP is dead.  (bbal sets neither IP_RECVERR nor
 * timestamping, so the kernel has little reason ever to raise POLLERR
 * here; when it does, something unknown is wrong, and the bound keeps a
 * persistent fault from becoming a busy loop.)
 *
 * TAKEOVER (src/takeover.ts).  open() may be given the descriptor of a
 * socket another bbal bound and passed over (fd_pass.c) instead of binding
 * one: it is configured as if it had been bound here, the wildcard check
 * read from getsockname().  fd() hands the descriptor to JavaScript for
 * passing on (fd_pass.c passes it); stopReading() stops the poll for good
 * while sends still work, so that a bbal handing over keeps answering the
 * queries it has already forwarded while the new one reads.
 *
 * Lifecycle: open -> closing (uv_close() called, poll stopped) -> closed
 * (the poll handle's close callback ran: fd closed, references released,
 * the done callback called).  Once closing, no JavaScript callback but the
 * done callback is ever called.  The C object is freed when it is both
 * closed and its JavaScript handle has been garbage collected, so a stale
 * handle can never reach freed memory.
 *
 * Linux only: recvmmsg() and sendmmsg().  Elsewhere the build fails and
 * bbal uses dgram.
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <node_api.h>
#include <uv.h>

/* Keep in step with src/udp_socket.ts, which checks them at load. */
#define UB_SLOTS 64
#define UB_SLOT_BYTES 1536
#define UB_META_WORDS 4
#define UB_MAX_BATCHES 4
#define UB_SOCKET_BUFFER_BYTES (4 * 1024 * 1024)
/* Poll errors in a row, with no datagram read between, before giving up. */
#define UB_MAX_POLL_ERRORS 16
/* Error-queue entries read per poll error. */
#define UB_ERRQUEUE_DRAIN 64

enum ub_state { UB_OPEN, UB_CLOSING, UB_CLOSED };

/* Room for one IP_PKTINFO control message, aligned as a cmsghdr. */
typedef union ub_control {
	struct cmsghdr align;
	char buf[CMSG_SPACE(sizeof (struct in_pktinfo))];
} ub_control_t;

typedef struct ub_socket {
	enum ub_state state;
	int finalized;
	int fd;
	int last_send_errno;
	/* Poll errors since a datagram was last read (see POLL ERRORS). */
	int poll_errors;
	/* Bound to the wildcard address: IP_PKTINFO on (see WILDCARD BINDS). */
	int pktinfo;
	/* stopReading() was called: the poll is never started again. */
	int reading_stopped;
	napi_env env;
	uv_poll_t poll;
	napi_async_context async_ctx;
	napi_ref resource_ref;
	napi_ref on_batch_ref;
	napi_ref on_closed_ref;
	napi_ref arena_refs[4];
	uint8_t *recv_data;
	uint32_t *recv_meta;
	uint8_t *send_data;
	uint32_t *send_meta;
	struct mmsghdr recv_msgs[UB_SLOTS];
	struct iovec recv_iov[UB_SLOTS];
	struct sockaddr_in recv_from[UB_SLOTS];
	ub_control_t recv_control[UB_SLOTS];
	struct mmsghdr send_msgs[UB_SLOTS];
	struct iovec send_iov[UB_SLOTS];
	struct sockaddr_in send_to[UB_SLOTS];
	ub_control_t send_control[UB_SLOTS];
} ub_socket_t;

#define NAPI_OK_OR_RETURN(env, call) do { \
	if ((call) != napi_ok) { \
		napi_throw_error((env), "EINVAL", "udp_batch: " #call " failed"); \
		return NULL; \
	} \
} while (0)

/* An Error whose .code is the errno's name, as Node's own errors carry. */
static void
ub_throw_errno(napi_env env, const char *syscall, int err)
{
	napi_value code, msg, error;
	char text[160];
	const char *name = uv_err_name(-err);

	snprintf(text, sizeof (text), "%s %s (%s)", syscall, name, strerror(err));
	if (napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &code) != napi_ok ||
	    napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &msg) != napi_ok ||
	    napi_create_error(env, code, msg, &error) != napi_ok) {
		napi_throw_error(env, name, text);
		return;
	}
	napi_value sc;
	if (napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &sc) == napi_ok) {
		napi_set_named_property(env, error, "syscall", sc);
	}
	napi_throw(env, error);
}

/*
 * Call a JavaScript function from a libuv callback, the way Node's own
 * handles do: in a handle scope, through napi_make_callback() so that
 * nextTick callbacks and microtasks run when it returns.  An exception is
 * rethrown as an uncaught one: a bug in the handler must not vanish here.
 */
static void
ub_call(ub_socket_t *u, napi_ref fn_ref, size_t argc, const napi_value *argv)
{
	napi_env env = u->env;
	napi_value fn, resource, result;
	napi_status st;

	if (napi_get_reference_value(env, fn_ref, &fn) != napi_ok ||
	    napi_get_reference_value(env, u->resource_ref, &resource) != napi_ok) {
		return;
	}
	st = napi_make_callback(env, u->async_ctx, resource, fn, argc, argv, &result);
	if (st == napi_pending_exception) {
		napi_value exc;
		if (napi_get_and_clear_last_exception(env, &exc) == napi_ok) {
			napi_fatal_exception(env, exc);
		}
	}
}

static void ub_on_poll(uv_poll_t *handle, int status, int events);

/*
 * onBatch(count) for a batch, onBatch(-code) for a receive error,
 * onBatch(-code, true) for a poll error that stopped the socket for good.
 */
static void
ub_call_batch(ub_socket_t *u, int32_t count, bool fatal)
{
	napi_handle_scope scope;
	napi_value args[2];

	if (napi_open_handle_scope(u->env, &scope) != napi_ok) {
		return;
	}
	if (napi_create_int32(u->env, count, &args[0]) == napi_ok &&
	    napi_get_boolean(u->env, fatal, &args[1]) == napi_ok) {
		ub_call(u, u->on_batch_ref, fatal ? 2 : 1, args);
	}
	napi_close_handle_scope(u->env, scope);
}

/*
 * Take the socket's pending error and drain its error queue, so that
 * POLLERR is not raised again for the same cause.  Returns the pending
 * error (an errno), or 0 when there was none.
 */
static int
ub_take_error(ub_socket_t *u)
{
	int err = 0, again = 0, i;
	socklen_t len = sizeof (err);
	char data[64], control[512];
	struct iovec iov;
	struct msghdr mh;

	(void) getsockopt(u->fd, SOL_SOCKET, SO_ERROR, &err, &len);
	for (i = 0; i < UB_ERRQUEUE_DRAIN; i++) {
		memset(&mh, 0, sizeof (mh));
		iov.iov_base = data;
		iov.iov_len = sizeof (data);
		mh.msg_iov = &iov;
		mh.msg_iovlen = 1;
		mh.msg_control = control;
		mh.msg_controllen = sizeof (control);
		if (recvmsg(u->fd, &mh, MSG_ERRQUEUE | MSG_DONTWAIT) < 0 && errno != EINTR) {
			break;
		}
	}
	/* Reading the queue may set the error of its next entry: take that too. */
	len = sizeof (again);
	(void) getsockopt(u->fd, SOL_SOCKET, SO_ERROR, &again, &len);
	return err != 0 ? err : again;
}

/* libuv has stopped the poll (see POLL ERRORS): start it again, or give up. */
static void
ub_poll_failed(ub_socket_t *u, int status)
{
	int err = ub_take_error(u), rc = 0;
	int32_t code = err != 0 ? -err : status;

	if (u->reading_stopped) {
		return;
	}
	if (++u->poll_errors > UB_MAX_POLL_ERRORS ||
	    (rc = uv_poll_start(&u->poll, UV_READABLE, ub_on_poll)) != 0) {
		ub_call_batch(u, rc != 0 ? rc : code, true);
		return;
	}
	ub_call_batch(u, code, false);
}

/* The local address (host order) in a datagram's IP_PKTINFO, or 0. */
static uint32_t
ub_local_addr(struct msghdr *mh)
{
	struct cmsghdr *c;

	for (c = CMSG_FIRSTHDR(mh); c != NULL; c = CMSG_NXTHDR(mh, c)) {
		if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO &&
		    c->cmsg_len >= CMSG_LEN(sizeof (struct in_pktinfo))) {
			struct in_pktinfo pi;

			memcpy(&pi, CMSG_DATA(c), sizeof (pi));
			return ntohl(pi.ipi_spec_dst.s_addr);
		}
	}
	return 0;
}

/* Read one batch; returns the count, 0 when there was nothing, or -errno. */
static int
ub_read_batch(ub_socket_t *u)
{
	int i, n;

	for (i = 0; i < UB_SLOTS; i++) {
		/* The kernel overwrites these: reset them for every call. */
		u->recv_msgs[i].msg_hdr.msg_namelen = sizeof (struct sockaddr_in);
		u->recv_msgs[i].msg_hdr.msg_flags = 0;
		u->recv_msgs[i].msg_len = 0;
		if (u->pktinfo) {
			u->recv_msgs[i].msg_hdr.msg_controllen = sizeof (u->recv_control[i]);
		}
	}
	do {
		n = recvmmsg(u->fd, u->recv_msgs, UB_SLOTS, MSG_DONTWAIT | MSG_TRUNC, NULL);
	} while (n < 0 && errno == EINTR);
	if (n < 0) {
		return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -errno;
	}
	for (i = 0; i < n; i++) {
		uint32_t *m = u->recv_meta + i * UB_META_WORDS;
		const struct sockaddr_in *from = &u->recv_from[i];

		/* With MSG_TRUNC, msg_len is the datagram's true length. */
		m[0] = u->recv_msgs[i].msg_len;
		if (u->recv_msgs[i].msg_hdr.msg_namelen >= sizeof (struct sockaddr_in) &&
		    from->sin_family == AF_INET) {
			m[1] = ntohl(from->sin_addr.s_addr);
			m[2] = ntohs(from->sin_port);
		} else {
			m[1] = 0;
			m[2] = 0;
		}
		m[3] = u->pktinfo ? ub_local_addr(&u->recv_msgs[i].msg_hdr) : 0;
	}
	return n;
}

static void
ub_on_poll(uv_poll_t *handle, int status, int events)
{
	ub_socket_t *u = handle->data;
	int batch;

	if (u->state != UB_OPEN) {
		return;
	}
	if (status < 0) {
		ub_poll_failed(u, status);
		return;
	}
	if ((events & UV_READABLE) == 0) {
		return;
	}
	for (batch = 0; batch < UB_MAX_BATCHES; batch++) {
		int n = ub_read_batch(u);
		if (n == 0) {
			return;
		}
		if (n > 0) {
			u->poll_errors = 0;
		}
		/* errno values and libuv's codes are the same on Linux, negated. */
		ub_call_batch(u, n, false);
		if (u->state != UB_OPEN || n < UB_SLOTS) {
			return;
		}
	}
}

static void
ub_release_refs(ub_socket_t *u)
{
	napi_env env = u->env;
	int i;

	for (i = 0; i < 4; i++) {
		if (u->arena_refs[i] != NULL) {
			napi_delete_reference(env, u->arena_refs[i]);
			u->arena_refs[i] = NULL;
		}
	}
	if (u->on_batch_ref != NULL) {
		napi_delete_reference(env, u->on_batch_ref);
		u->on_batch_ref = NULL;
	}
	u->recv_data = u->send_data = NULL;
	u->recv_meta = u->send_meta = NULL;
}

static void
ub_on_closed(uv_handle_t *handle)
{
	ub_socket_t *u = handle->data;
	napi_env env = u->env;
	napi_handle_scope scope;

	close(u->fd);
	u->fd = -1;
	u->state = UB_CLOSED;
	if (napi_open_handle_scope(env, &scope) == napi_ok) {
		if (u->on_closed_ref != NULL) {
			ub_call(u, u->on_closed_ref, 0, NULL);
		}
		napi_close_handle_scope(env, scope);
	}
	if (u->on_closed_ref != NULL) {
		napi_delete_reference(env, u->on_closed_ref);
		u->on_closed_ref = NULL;
	}
	ub_release_refs(u);
	napi_async_destroy(env, u->async_ctx);
	napi_delete_reference(env, u->resource_ref);
	u->resource_ref = NULL;
	if (u->finalized) {
		free(u);
	}
}

static void
ub_finalize(napi_env env, void *data, void *hint)
{
	ub_socket_t *u = data;

	(void) env;
	(void) hint;
	u->finalized = 1;
	if (u->state == UB_CLOSED) {
		free(u);
	} else if (u->state == UB_OPEN) {
		/*
		 * Only at environment teardown can an open socket lose its handle
		 * (its callback reference keeps it alive otherwise).  The loop may
		 * not run again: stop watching, close the fd, leak the rest.
		 */
		uv_poll_stop(&u->poll);
		close(u->fd);
		u->fd = -1;
		u->state = UB_CLOSING;
	}
}

static ub_socket_t *
ub_unwrap(napi_env env, napi_value handle)
{
	ub_socket_t *u = NULL;
	napi_valuetype t;

	if (napi_typeof(env, handle, &t) != napi_ok || t != napi_external ||
	    napi_get_value_external(env, handle, (void **) &u) != napi_ok || u == NULL) {
		napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "udp_batch: not a socket handle");
		return NULL;
	}
	return u;
}

/* Hold an ArrayBuffer of exactly `want` bytes; NULL (and a throw) if not. */
static void *
ub_hold_arena(napi_env env, napi_value ab, size_t want, napi_ref *ref)
{
	bool is_ab = false;
	void *data = NULL;
	size_t len = 0;

	if (napi_is_arraybuffer(env, ab, &is_ab) != napi_ok || !is_ab ||
	    napi_get_arraybuffer_info(env, ab, &data, &len) != napi_ok || len != want) {
		napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "udp_batch: arena of the wrong kind or size");
		return NULL;
	}
	if (napi_create_reference(env, ab, 1, ref) != napi_ok) {
		napi_throw_error(env, "EINVAL", "udp_batch: cannot hold arena");
		return NULL;
	}
	return data;
}

/*
 * open(addr u32, port, recvData, recvMeta, sendData, sendMeta, onBatch[, fd])
 *   -> handle.  Creates, configures and binds the socket and starts
 *   watching it; throws an Error with .code (EADDRINUSE ...) on failure.
 *   Given fd (a bound UDP socket passed over by a bbal handing over; see
 *   TAKEOVER), adopts it instead of binding: addr and port are ignored.
 */
static napi_value
ub_open(napi_env env, napi_callback_info info)
{
	napi_value argv[8], handle, resource, name;
	size_t argc = 8;
	uint32_t addr, port;
	int32_t adopt = -1;
	napi_valuetype t;
	ub_socket_t *u;
	struct sockaddr_in sin;
	int fd, one = 1, size = UB_SOCKET_BUFFER_BYTES, i, err;
	uv_loop_t *loop;
	const size_t data_bytes = (size_t) UB_SLOTS * UB_SLOT_BYTES;
	const size_t meta_bytes = (size_t) UB_SLOTS * UB_META_WORDS * sizeof (uint32_t);

	NAPI_OK_OR_RETURN(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
	if (argc < 7 || napi_get_value_uint32(env, argv[0], &addr) != napi_ok ||
	    napi_get_value_uint32(env, argv[1], &port) != napi_ok || port > 65535 ||
	    napi_typeof(env, argv[6], &t) != napi_ok || t != napi_function) {
		napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE",
		    "udp_batch: open(addr, port, recvData, recvMeta, sendData, sendMeta, onBatch[, fd])");
		return NULL;
	}
	if (argc >= 8 && (napi_get_value_int32(env, argv[7], &adopt) != napi_ok || adopt < 0)) {
		napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "udp_batch: open(): fd must be a descriptor");
		return NULL;
	}
	NAPI_OK_OR_RETURN(env, napi_get_uv_event_loop(env, &loop));

	u = calloc(1, sizeof (*u));
	if (u == NULL) {
		ub_throw_errno(env, "calloc", ENOMEM);
		return NULL;
	}
	u->env = env;
	u->fd = -1;
	if ((u->recv_data = ub_hold_arena(env, argv[2], data_bytes, &u->arena_refs[0])) == NULL ||
	    (u->recv_meta = ub_hold_arena(env, argv[3], meta_bytes, &u->arena_refs[1])) == NULL ||
	    (u->send_data = ub_hold_arena(env, argv[4], data_bytes, &u->arena_refs[2])) == NULL ||
	    (u->send_meta = ub_hold_arena(env, argv[5], meta_bytes, &u->arena_refs[3])) == NULL) {
		goto fail;
	}

	if (adopt >= 0) {
		struct sockaddr_in bound;
		socklen_t blen = sizeof (bound);
		int type = 0;
		socklen_t tlen = sizeof (type);

		if (getsockopt(adopt, SOL_SOCKET, SO_TYPE, &type, &tlen) != 0 ||
		    getsockname(adopt, (struct sockaddr *) &bound, &blen) != 0) {
			ub_throw_errno(env, "getsockname", errno);
			goto fail;
		}
		if (type != SOCK_DGRAM || bound.sin_family != AF_INET) {
			ub_throw_errno(env, "open", ENOTSOCK);
			goto fail;
		}
		u->fd = fd = adopt;
		addr = ntohl(bound.sin_addr.s_addr);
		(void) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
		(void) fcntl(fd, F_SETFD, FD_CLOEXEC);
	} else {
		fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (fd < 0) {
			ub_throw_errno(env, "socket", errno);
			goto fail;
		}
		u->fd = fd;
		/*
		 * No SO_REUSEADDR: UDP has no TIME_WAIT for it to skip, and with
		 * it on both, Linux lets a second socket bind the same port and
		 * hands it the datagrams -- a second DNS server (or bbal) would
		 * take bbal's queries silently instead of failing with EADDRINUSE.
		 */
		memset(&sin, 0, sizeof (sin));
		sin.sin_family = AF_INET;
		sin.sin_addr.s_addr = htonl(addr);
		sin.sin_port = htons((uint16_t) port);
		if (bind(fd, (struct sockaddr *) &sin, sizeof (sin)) != 0) {
			ub_throw_errno(env, "bind", errno);
			goto fail;
		}
	}
	/* Room for bursts; best effort, capped by net.core.[rw]mem_max. */
	(void) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof (size));
	(void) setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof (size));
	if (addr == INADDR_ANY) {
		if (setsockopt(fd, IPPROTO_IP, IP_PKTINFO, &one, sizeof (one)) != 0) {
			ub_throw_errno(env, "setsockopt", errno);
			goto fail;
		}
		u->pktinfo = 1;
	}

	for (i = 0; i < UB_SLOTS; i++) {
		u->recv_iov[i].iov_base = u->recv_data + (size_t) i * UB_SLOT_BYTES;
		u->recv_iov[i].iov_len = UB_SLOT_BYTES;
		u->recv_msgs[i].msg_hdr.msg_name = &u->recv_from[i];
		u->recv_msgs[i].msg_hdr.msg_namelen = sizeof (struct sockaddr_in);
		u->recv_msgs[i].msg_hdr.msg_iov = &u->recv_iov[i];
		u->recv_msgs[i].msg_hdr.msg_iovlen = 1;
		if (u->pktinfo) {
			u->recv_msgs[i].msg_hdr.msg_control = &u->recv_control[i];
			u->recv_msgs[i].msg_hdr.msg_controllen = sizeof (u->recv_control[i]);
		}
		u->send_iov[i].iov_base = u->send_data + (size_t) i * UB_SLOT_BYTES;
		u->send_msgs[i].msg_hdr.msg_name = &u->send_to[i];
		u->send_msgs[i].msg_hdr.msg_namelen = sizeof (struct sockaddr_in);
		u->send_msgs[i].msg_hdr.msg_iov = &u->send_iov[i];
		u->send_msgs[i].msg_hdr.msg_iovlen = 1;
		u->send_to[i].sin_family = AF_INET;
	}

	if (napi_create_reference(env, argv[6], 1, &u->on_batch_ref) != napi_ok ||
	    napi_create_object(env, &resource) != napi_ok ||
	    napi_create_reference(env, resource, 1, &u->resource_ref) != napi_ok ||
	    napi_create_string_utf8(env, "bbal:udp_batch", NAPI_AUTO_LENGTH, &name) != napi_ok ||
	    napi_async_init(env, resource, name, &u->async_ctx) != napi_ok) {
		napi_throw_error(env, "EINVAL", "udp_batch: cannot set up the callback");
		goto fail;
	}
	if ((err = uv_poll_init(loop, &u->poll, fd)) != 0) {
		napi_async_destroy(env, u->async_ctx);
		ub_throw_errno(env, "uv_poll_init", -err);
		goto fail;
	}
	u->poll.data = u;
	if ((err = uv_poll_start(&u->poll, UV_READABLE, ub_on_poll)) != 0) {
		/*
		 * The handle is initialised: it must go through uv_close().  No
		 * JavaScript handle exists to be finalized, so the close
		 * callback frees the object.
		 */
		ub_throw_errno(env, "uv_poll_start", -err);
		u->state = UB_CLOSING;
		u->finalized = 1;
		uv_close((uv_handle_t *) &u->poll, ub_on_closed);
		return NULL;
	}
	if (napi_create_external(env, u, ub_finalize, NULL, &handle) != napi_ok) {
		napi_throw_error(env, "EINVAL", "udp_batch: cannot create the handle");
		u->state = UB_CLOSING;
		u->finalized = 1;
		uv_poll_stop(&u->poll);
		uv_close((uv_handle_t *) &u->poll, ub_on_closed);
		return NULL;
	}
	u->state = UB_OPEN;
	return handle;

fail:
	if (u->fd >= 0) {
		close(u->fd);
	}
	ub_release_refs(u);
	if (u->resource_ref != NULL) {
		napi_delete_reference(env, u->resource_ref);
	}
	free(u);
	return NULL;
}

/* send(handle, count) -> how many of slots 0..count-1 the kernel took. */
static napi_value
ub_send(napi_env env, napi_callback_info info)
{
	napi_value argv[2], result;
	size_t argc = 2;
	uint32_t count;
	ub_socket_t *u;
	int start = 0, sent = 0, i;

	NAPI_OK_OR_RETURN(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
	if (argc < 2 || (u = ub_unwrap(env, argv[0])) == NULL) {
		return NULL;
	}
	if (napi_get_value_uint32(env, argv[1], &count) != napi_ok || count > UB_SLOTS) {
		napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "udp_batch: send count out of range");
		return NULL;
	}
	if (u->state != UB_OPEN) {
		u->last_send_errno = EBADF;
		count = 0;
	}
	for (i = 0; i < (int) count; i++) {
		const uint32_t *m = u->send_meta + i * UB_META_WORDS;
		uint32_t len = m[0] > UB_SLOT_BYTES ? UB_SLOT_BYTES : m[0];

		u->send_iov[i].iov_len = len;
		u->send_to[i].sin_addr.s_addr = htonl(m[1]);
		u->send_to[i].sin_port = htons((uint16_t) m[2]);
		u->send_msgs[i].msg_hdr.msg_namelen = sizeof (struct sockaddr_in);
		u->send_msgs[i].msg_len = 0;
		if (u->pktinfo && m[3] != 0) {
			/* From the address the query was sent to (WILDCARD BINDS). */
			struct msghdr *mh = &u->send_msgs[i].msg_hdr;
			struct cmsghdr *c;
			struct in_pktinfo pi;

			mh->msg_control = &u->send_control[i];
			mh->msg_controllen = CMSG_SPACE(sizeof (pi));
			c = CMSG_FIRSTHDR(mh);
			c->cmsg_level = IPPROTO_IP;
			c->cmsg_type = IP_PKTINFO;
			c->cmsg_len = CMSG_LEN(sizeof (pi));
			memset(&pi, 0, sizeof (pi));
			pi.ipi_spec_dst.s_addr = htonl(m[3]);
			memcpy(CMSG_DATA(c), &pi, sizeof (pi));
		} else {
			u->send_msgs[i].msg_hdr.msg_control = NULL;
			u->send_msgs[i].msg_hdr.msg_controllen = 0;
		}
	}
	while (start < (int) count) {
		int n = sendmmsg(u->fd, &u->send_msgs[start], count - start, MSG_DONTWAIT);
		if (n > 0) {
			sent += n;
			start += n;
			continue;
		}
		if (n < 0 && errno == EINTR) {
			continue;
		}
		u->last_send_errno = n < 0 ? errno : EIO;
		if (n == 0 || errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) {
			/* The buffer is full: the rest would fail alike.  Drop them. */
			break;
		}
		/* This one datagram is refused (EPERM from a firewall ...): skip it. */
		start++;
	}
	NAPI_OK_OR_RETURN(env, napi_create_int32(env, sent, &result));
	return result;
}

/* sendErrno(handle) -> the errno name of the last failed send, or "". */
static napi_value
ub_send_errno(napi_env env, napi_callback_info info)
{
	napi_value argv[1], result;
	size_t argc = 1;
	ub_socket_t *u;
	int err;

	NAPI_OK_OR_RETURN(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
	if (argc < 1 || (u = ub_unwrap(env, argv[0])) == NULL) {
		return NULL;
	}
	err = u->last_send_errno;
	u->last_send_errno = 0;
	NAPI_OK_OR_RETURN(env, napi_create_string_utf8(env, err == 0 ? "" : uv_err_name(-err),
	    NAPI_AUTO_LENGTH, &result));
	return result;
}

/* errName(code) -> "ECONNREFUSED" for a negative libuv code. */
static napi_value
ub_err_name(napi_env env, napi_callback_info info)
{
	napi_value argv[1], result;
	size_t argc = 1;
	int32_t code;

	NAPI_OK_OR_RETURN(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
	if (argc < 1 || napi_get_value_int32(env, argv[0], &code) != napi_ok) {
		napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "udp_batch: errName(code)");
		return NULL;
	}
	NAPI_OK_OR_RETURN(env, napi_create_string_utf8(env, uv_err_name(code), NAPI_AUTO_LENGTH, &result));
	return result;
}

/* localPort(handle) -> the bound port (useful after binding port 0). */
static napi_value
ub_local_port(napi_env env, napi_callback_info info)
{
	napi_value argv[1], result;
	size_t argc = 1;
	ub_socket_t *u;
	struct sockaddr_in sin;
	socklen_t len = sizeof (sin);

	NAPI_OK_OR_RETURN(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
	if (argc < 1 || (u = ub_unwrap(env, argv[0])) == NULL) {
		return NULL;
	}
	if (u->state != UB_OPEN || getsockname(u->fd, (struct sockaddr *) &sin, &len) != 0) {
		ub_throw_errno(env, "getsockname", u->state != UB_OPEN ? EBADF : errno);
		return NULL;
	}
	NAPI_OK_OR_RETURN(env, napi_create_uint32(env, ntohs(sin.sin_port), &result));
	return result;
}

/* fd(handle) -> the socket's descriptor, for passing on (TAKEOVER). */
static napi_value
ub_fd(napi_env env, napi_callback_info info)
{
	napi_value argv[1], result;
	size_t argc = 1;
	ub_socket_t *u;

	NAPI_OK_OR_RETURN(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
	if (argc < 1 || (u = ub_unwrap(env, argv[0])) == NULL) {
		return NULL;
	}
	NAPI_OK_OR_RETURN(env, napi_create_int32(env, u->state == UB_OPEN ? u->fd : -1, &result));
	return result;
}

/*
 * stopReading(handle): stop the poll for good; send() still works (see
 * TAKEOVER).  Datagrams then wait in the socket for whoever else reads it.
 */
static napi_value
ub_stop_reading(napi_env env, napi_callback_info info)
{
	napi_value argv[1];
	size_t argc = 1;
	ub_socket_t *u;

	NAPI_OK_OR_RETURN(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
	if (argc < 1 || (u = ub_unwrap(env, argv[0])) == NULL) {
		return NULL;
	}
	if (u->state == UB_OPEN && !u->reading_stopped) {
		u->reading_stopped = 1;
		uv_poll_stop(&u->poll);
	}
	return NULL;
}

/*
 * recvErr(handle): turn IP_RECVERR on.  A test seam, not used by bbal:
 * with it, an answer to a port nobody listens on comes back as an ICMP
 * error on the socket, and poll() reports POLLERR -- the one way a test
 * can make the kernel raise the condition POLL ERRORS is about.
 */
static napi_value
ub_recv_err(napi_env env, napi_callback_info info)
{
	napi_value argv[1];
	size_t argc = 1;
	ub_socket_t *u;
	int one = 1;

	NAPI_OK_OR_RETURN(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
	if (argc < 1 || (u = ub_unwrap(env, argv[0])) == NULL) {
		return NULL;
	}
	if (u->state != UB_OPEN || setsockopt(u->fd, IPPROTO_IP, IP_RECVERR, &one, sizeof (one)) != 0) {
		ub_throw_errno(env, "setsockopt", u->state != UB_OPEN ? EBADF : errno);
	}
	return NULL;
}

/*
 * close(handle, onClosed): stop watching at once; the fd is closed and
 * onClosed called from the poll handle's close callback.  Idempotent: a
 * second call returns false and never calls its onClosed.
 */
static napi_value
ub_close(napi_env env, napi_callback_info info)
{
	napi_value argv[2], result;
	size_t argc = 2;
	ub_socket_t *u;
	napi_valuetype t;
	bool started = false;

	NAPI_OK_OR_RETURN(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
	if (argc < 1 || (u = ub_unwrap(env, argv[0])) == NULL) {
		return NULL;
	}
	if (u->state == UB_OPEN) {
		if (argc >= 2 && napi_typeof(env, argv[1], &t) == napi_ok && t == napi_function) {
			napi_create_reference(env, argv[1], 1, &u->on_closed_ref);
		}
		u->state = UB_CLOSING;
		uv_poll_stop(&u->poll);
		uv_close((uv_handle_t *) &u->poll, ub_on_closed);
		started = true;
	}
	NAPI_OK_OR_RETURN(env, napi_get_boolean(env, started, &result));
	return result;
}

static napi_value
ub_init(napi_env env, napi_value exports)
{
	napi_property_descriptor props[] = {
		{ "open", NULL, ub_open, NULL, NULL, NULL, napi_enumerable, NULL },
		{ "send", NULL, ub_send, NULL, NULL, NULL, napi_enumerable, NULL },
		{ "sendErrno", NULL, ub_send_errno, NULL, NULL, NULL, napi_enumerable, NULL },
		{ "errName", NULL, ub_err_name, NULL, NULL, NULL, napi_enumerable, NULL },
		{ "localPort", NULL, ub_local_port, NULL, NULL, NULL, napi_enumerable, NULL },
		{ "close", NULL, ub_close, NULL, NULL, NULL, napi_enumerable, NULL },
		{ "recvErr", NULL, ub_recv_err, NULL, NULL, NULL, napi_enumerable, NULL },
		{ "fd", NULL, ub_fd, NULL, NULL, NULL, napi_enumerable, NULL },
		{ "stopReading", NULL, ub_stop_reading, NULL, NULL, NULL, napi_enumerable, NULL },
	};
	napi_value v;

	if (napi_define_properties(env, exports, sizeof (props) / sizeof (props[0]), props) != napi_ok) {
		return NULL;
	}
	/* The arena geometry, so JavaScript can check it agrees. */
	if (napi_create_uint32(env, UB_SLOTS, &v) == napi_ok) {
		napi_set_named_property(env, exports, "SLOTS", v);
	}
	if (napi_create_uint32(env, UB_SLOT_BYTES, &v) == napi_ok) {
		napi_set_named_property(env, exports, "SLOT_BYTES", v);
	}
	if (napi_create_uint32(env, UB_META_WORDS, &v) == napi_ok) {
		napi_set_named_property(env, exports, "META_WORDS", v);
	}
	return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, ub_init)
