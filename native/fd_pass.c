/*
 * FD PASS
 *
 * What a takeover (src/takeover.ts) needs from the kernel that Node does
 * not give: passing open sockets from one process to another, and telling
 * systemd that the service's main process has changed.
 *
 * Node can pass a handle only over the IPC channel between a parent and a
 * child it forked, and the bbal taking over is started by an operator or a
 * service manager, not by the running one.  So the descriptors travel as
 * SCM_RIGHTS ancillary data on the AF_UNIX control socket, sent and
 * received here.  The receiving side reads that one message with
 * recvFds() before anything else reads the connection: Node's own reads
 * (read(2), not recvmsg) would discard the descriptors.
 *
 * The control and stats sockets are made here too (listenUnix): a Unix
 * socket that Node binds by path is unlinked by Node when it is closed,
 * and after a takeover the file belongs to the new process, which keeps
 * listening on the same socket.  Listening on a descriptor made here,
 * Node never learns the path and never removes it; bbal removes it itself
 * on a clean exit that hands nothing over.
 *
 *   listenUnix(path, backlog) -> fd       socket, bind, listen
 *   connectUnix(path) -> fd               socket, connect (then non-blocking)
 *   sendFds(fd, data, fds) -> bytes       one sendmsg() with SCM_RIGHTS
 *   recvFds(fd, max, timeoutMs)           poll, one recvmsg();
 *     -> { data, fds }                      throws ETIMEDOUT after timeoutMs
 *   closeFd(fd)                           a received descriptor not taken up
 *   notify(path, text, barrier) -> fd     sd_notify(3) to NOTIFY_SOCKET; with
 *                                           barrier, also BARRIER=1 and the
 *                                           read end of a pipe that reaches
 *                                           EOF once systemd has handled the
 *                                           message (sd_notify_barrier(3));
 *                                           else -1
 *
 * Every descriptor made or received here is close-on-exec.  Errors are
 * thrown as Errors whose .code is the errno's name.
 *
 * An addon of its own (fd_pass.node), apart from the Linux-only UDP
 * transport: nothing here is Linux's alone, so illumos, where bbal uses
 * dgram, can take over too.  notify() is for systemd, which is Linux's.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <node_api.h>
#include <uv.h>

#ifndef MSG_CMSG_CLOEXEC
#define MSG_CMSG_CLOEXEC 0
#define FP_SET_CLOEXEC_AFTER 1
#endif
#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif

/* Descriptors in one message, either way. */
#define FP_MAX_FDS 16
/* The largest message recvFds() reads. */
#define FP_MAX_BYTES (64 * 1024)

static void
fp_throw_errno(napi_env env, const char *syscall, int err)
{
	napi_value code, msg, error, sc;
	char text[200];
	const char *name = uv_err_name(-err);

	snprintf(text, sizeof (text), "%s %s (%s)", syscall, name, strerror(err));
	if (napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &code) != napi_ok ||
	    napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &msg) != napi_ok ||
	    napi_create_error(env, code, msg, &error) != napi_ok) {
		napi_throw_error(env, name, text);
		return;
	}
	if (napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &sc) == napi_ok) {
		napi_set_named_property(env, error, "syscall", sc);
	}
	napi_throw(env, error);
}

static void
fp_throw_type(napi_env env, const char *usage)
{
	napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", usage);
}

/* A path argument into a sockaddr_un; '@' first is the abstract namespace (NOTIFY_SOCKET). */
static int
fp_sockaddr(napi_env env, napi_value v, struct sockaddr_un *sun, socklen_t *len)
{
	size_t n = 0;

	memset(sun, 0, sizeof (*sun));
	sun->sun_family = AF_UNIX;
	if (napi_get_value_string_utf8(env, v, sun->sun_path, sizeof (sun->sun_path), &n) != napi_ok ||
	    n == 0 || n >= sizeof (sun->sun_path) - 1) {
		return -1;
	}
	*len = (socklen_t) (offsetof(struct sockaddr_un, sun_path) + n + 1);
	if (sun->sun_path[0] == '@') {
		sun->sun_path[0] = '\0';
		*len = (socklen_t) (offsetof(struct sockaddr_un, sun_path) + n);
	}
	return 0;
}

static int
fp_get_fd(napi_env env, napi_value v, int *fd)
{
	int32_t x;

	if (napi_get_value_int32(env, v, &x) != napi_ok || x < 0) {
		return -1;
	}
	*fd = x;
	return 0;
}

static napi_value
fp_int(napi_env env, int x)
{
	napi_value r;

	return napi_create_int32(env, x, &r) == napi_ok ? r : NULL;
}

/* listenUnix(path, backlog) -> fd */
static napi_value
fp_listen_unix(napi_env env, napi_callback_info info)
{
	napi_value argv[2];
	size_t argc = 2;
	struct sockaddr_un sun;
	socklen_t len;
	int32_t backlog;
	int fd;

	if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 ||
	    fp_sockaddr(env, argv[0], &sun, &len) != 0 ||
	    napi_get_value_int32(env, argv[1], &backlog) != napi_ok) {
		fp_throw_type(env, "fd_pass: listenUnix(path, backlog)");
		return NULL;
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		fp_throw_errno(env, "socket", errno);
		return NULL;
	}
	if (bind(fd, (struct sockaddr *) &sun, len) != 0) {
		fp_throw_errno(env, "bind", errno);
		close(fd);
		return NULL;
	}
	if (listen(fd, backlog) != 0) {
		fp_throw_errno(env, "listen", errno);
		close(fd);
		return NULL;
	}
	return fp_int(env, fd);
}

/* connectUnix(path) -> fd, connected and non-blocking. */
static napi_value
fp_connect_unix(napi_env env, napi_callback_info info)
{
	napi_value argv[1];
	size_t argc = 1;
	struct sockaddr_un sun;
	socklen_t len;
	int fd, rc;

	if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 ||
	    fp_sockaddr(env, argv[0], &sun, &len) != 0) {
		fp_throw_type(env, "fd_pass: connectUnix(path)");
		return NULL;
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		fp_throw_errno(env, "socket", errno);
		return NULL;
	}
	do {
		rc = connect(fd, (struct sockaddr *) &sun, len);
	} while (rc != 0 && errno == EINTR);
	if (rc != 0) {
		fp_throw_errno(env, "connect", errno);
		close(fd);
		return NULL;
	}
	(void) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	return fp_int(env, fd);
}

/* Fill a cmsg with descriptors; returns the control length used. */
static size_t
fp_put_fds(char *control, size_t room, const int *fds, int n)
{
	struct msghdr mh;
	struct cmsghdr *c;

	memset(&mh, 0, sizeof (mh));
	mh.msg_control = control;
	mh.msg_controllen = room;
	c = CMSG_FIRSTHDR(&mh);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof (int) * (size_t) n);
	memcpy(CMSG_DATA(c), fds, sizeof (int) * (size_t) n);
	return CMSG_SPACE(sizeof (int) * (size_t) n);
}

/* sendFds(fd, data, fds) -> bytes sent (all of data, or an error thrown). */
static napi_value
fp_send_fds(napi_env env, napi_callback_info info)
{
	napi_value argv[3], el;
	size_t argc = 3, dlen = 0;
	void *data = NULL;
	uint32_t n = 0, i;
	bool is_array = false, is_buffer = false;
	int fd, fds[FP_MAX_FDS];
	char control[CMSG_SPACE(sizeof (int) * FP_MAX_FDS)];
	struct iovec iov;
	struct msghdr mh;
	ssize_t sent;

	if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3 ||
	    fp_get_fd(env, argv[0], &fd) != 0 ||
	    napi_is_buffer(env, argv[1], &is_buffer) != napi_ok || !is_buffer ||
	    napi_get_buffer_info(env, argv[1], &data, &dlen) != napi_ok || dlen == 0 ||
	    napi_is_array(env, argv[2], &is_array) != napi_ok || !is_array ||
	    napi_get_array_length(env, argv[2], &n) != napi_ok || n == 0 || n > FP_MAX_FDS) {
		fp_throw_type(env, "fd_pass: sendFds(fd, data, fds)");
		return NULL;
	}
	for (i = 0; i < n; i++) {
		if (napi_get_element(env, argv[2], i, &el) != napi_ok || fp_get_fd(env, el, &fds[i]) != 0) {
			fp_throw_type(env, "fd_pass: sendFds(): fds must be descriptors");
			return NULL;
		}
	}
	memset(&mh, 0, sizeof (mh));
	iov.iov_base = data;
	iov.iov_len = dlen;
	mh.msg_iov = &iov;
	mh.msg_iovlen = 1;
	mh.msg_control = control;
	mh.msg_controllen = fp_put_fds(control, sizeof (control), fds, (int) n);
	do {
		sent = sendmsg(fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
	} while (sent < 0 && errno == EINTR);
	if (sent < 0) {
		fp_throw_errno(env, "sendmsg", errno);
		return NULL;
	}
	if ((size_t) sent != dlen) {
		/* The descriptors went with the first byte; the rest would need a second write. */
		fp_throw_errno(env, "sendmsg", EMSGSIZE);
		return NULL;
	}
	return fp_int(env, (int) sent);
}

/* recvFds(fd, maxBytes, timeoutMs) -> { data: Buffer, fds: number[] } */
static napi_value
fp_recv_fds(napi_env env, napi_callback_info info)
{
	napi_value argv[3], result, buf, arr;
	size_t argc = 3;
	int32_t max, timeout;
	int fd, rc, nfds = 0, i;
	char control[CMSG_SPACE(sizeof (int) * FP_MAX_FDS)];
	int got[FP_MAX_FDS];
	struct iovec iov;
	struct msghdr mh;
	struct cmsghdr *c;
	struct pollfd pfd;
	ssize_t n;
	void *data;
	char *tmp;

	if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3 ||
	    fp_get_fd(env, argv[0], &fd) != 0 ||
	    napi_get_value_int32(env, argv[1], &max) != napi_ok || max <= 0 || max > FP_MAX_BYTES ||
	    napi_get_value_int32(env, argv[2], &timeout) != napi_ok || timeout < 0) {
		fp_throw_type(env, "fd_pass: recvFds(fd, maxBytes, timeoutMs)");
		return NULL;
	}
	pfd.fd = fd;
	pfd.events = POLLIN;
	do {
		rc = poll(&pfd, 1, timeout);
	} while (rc < 0 && errno == EINTR);
	if (rc < 0) {
		fp_throw_errno(env, "poll", errno);
		return NULL;
	}
	if (rc == 0) {
		fp_throw_errno(env, "poll", ETIMEDOUT);
		return NULL;
	}
	if ((tmp = malloc((size_t) max)) == NULL) {
		fp_throw_errno(env, "malloc", ENOMEM);
		return NULL;
	}
	memset(&mh, 0, sizeof (mh));
	iov.iov_base = tmp;
	iov.iov_len = (size_t) max;
	mh.msg_iov = &iov;
	mh.msg_iovlen = 1;
	mh.msg_control = control;
	mh.msg_controllen = sizeof (control);
	do {
		n = recvmsg(fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
	} while (n < 0 && errno == EINTR);
	if (n < 0) {
		free(tmp);
		fp_throw_errno(env, "recvmsg", errno);
		return NULL;
	}
	for (c = CMSG_FIRSTHDR(&mh); c != NULL; c = CMSG_NXTHDR(&mh, c)) {
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
			int k = (int) ((c->cmsg_len - CMSG_LEN(0)) / sizeof (int));

			for (i = 0; i < k && nfds < FP_MAX_FDS; i++) {
				memcpy(&got[nfds++], CMSG_DATA(c) + (size_t) i * sizeof (int), sizeof (int));
#ifdef FP_SET_CLOEXEC_AFTER
				(void) fcntl(got[nfds - 1], F_SETFD, FD_CLOEXEC);
#endif
			}
		}
	}
	if ((mh.msg_flags & MSG_CTRUNC) != 0) {
		/* More descriptors than we take: close what came, refuse the message. */
		for (i = 0; i < nfds; i++) {
			close(got[i]);
		}
		free(tmp);
		fp_throw_errno(env, "recvmsg", EMSGSIZE);
		return NULL;
	}
	if (napi_create_object(env, &result) != napi_ok ||
	    napi_create_buffer_copy(env, (size_t) n, tmp, &data, &buf) != napi_ok ||
	    napi_create_array_with_length(env, (size_t) nfds, &arr) != napi_ok) {
		for (i = 0; i < nfds; i++) {
			close(got[i]);
		}
		free(tmp);
		napi_throw_error(env, "EINVAL", "fd_pass: cannot build the result");
		return NULL;
	}
	free(tmp);
	for (i = 0; i < nfds; i++) {
		napi_set_element(env, arr, (uint32_t) i, fp_int(env, got[i]));
	}
	napi_set_named_property(env, result, "data", buf);
	napi_set_named_property(env, result, "fds", arr);
	return result;
}

/* closeFd(fd): a received descriptor nothing took up. */
static napi_value
fp_close_fd(napi_env env, napi_callback_info info)
{
	napi_value argv[1];
	size_t argc = 1;
	int fd;

	if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 ||
	    fp_get_fd(env, argv[0], &fd) != 0) {
		fp_throw_type(env, "fd_pass: closeFd(fd)");
		return NULL;
	}
	(void) close(fd);
	return NULL;
}

/* notify(path, text, barrier) -> the barrier pipe's read end, or -1. */
static napi_value
fp_notify(napi_env env, napi_callback_info info)
{
	napi_value argv[3];
	size_t argc = 3, tlen = 0;
	struct sockaddr_un sun;
	socklen_t len;
	char text[1024];
	bool barrier = false;
	int fd, pipefd[2] = { -1, -1 };
	struct iovec iov;
	struct msghdr mh;
	char control[CMSG_SPACE(sizeof (int))];
	static char barrier_text[] = "BARRIER=1";

	if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3 ||
	    fp_sockaddr(env, argv[0], &sun, &len) != 0 ||
	    napi_get_value_string_utf8(env, argv[1], text, sizeof (text), &tlen) != napi_ok || tlen == 0 ||
	    napi_get_value_bool(env, argv[2], &barrier) != napi_ok) {
		fp_throw_type(env, "fd_pass: notify(path, text, barrier)");
		return NULL;
	}
	fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		fp_throw_errno(env, "socket", errno);
		return NULL;
	}
	memset(&mh, 0, sizeof (mh));
	iov.iov_base = text;
	iov.iov_len = tlen;
	mh.msg_name = &sun;
	mh.msg_namelen = len;
	mh.msg_iov = &iov;
	mh.msg_iovlen = 1;
	if (sendmsg(fd, &mh, MSG_NOSIGNAL) < 0) {
		fp_throw_errno(env, "sendmsg", errno);
		close(fd);
		return NULL;
	}
	if (barrier) {
		if (pipe2(pipefd, O_CLOEXEC | O_NONBLOCK) != 0) {
			fp_throw_errno(env, "pipe2", errno);
			close(fd);
			return NULL;
		}
		iov.iov_base = barrier_text;
		iov.iov_len = sizeof (barrier_text) - 1;
		mh.msg_control = control;
		mh.msg_controllen = fp_put_fds(control, sizeof (control), &pipefd[1], 1);
		if (sendmsg(fd, &mh, MSG_NOSIGNAL) < 0) {
			fp_throw_errno(env, "sendmsg", errno);
			close(pipefd[0]);
			close(pipefd[1]);
			close(fd);
			return NULL;
		}
		/* systemd now holds the write end; ours must go for EOF to mean it let go. */
		close(pipefd[1]);
	}
	close(fd);
	return fp_int(env, pipefd[0]);
}

static napi_value
fp_init(napi_env env, napi_value exports)
{
	napi_property_descriptor props[] = {
		{ "listenUnix", NULL, fp_listen_unix, NULL, NULL, NULL, napi_enumerable, NULL },
		{ "connectUnix", NULL, fp_connect_unix, NULL, NULL, NULL, napi_enumerable, NULL },
		{ "sendFds", NULL, fp_send_fds, NULL, NULL, NULL, napi_enumerable, NULL },
		{ "recvFds", NULL, fp_recv_fds, NULL, NULL, NULL, napi_enumerable, NULL },
		{ "closeFd", NULL, fp_close_fd, NULL, NULL, NULL, napi_enumerable, NULL },
		{ "notify", NULL, fp_notify, NULL, NULL, NULL, napi_enumerable, NULL },
	};

	if (napi_define_properties(env, exports, sizeof (props) / sizeof (props[0]), props) != napi_ok) {
		return NULL;
	}
	return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, fp_init)
