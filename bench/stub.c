/*
 * stub: the fastest backend we can put behind a DNS proxy, for the benchmark.
 *
 * It answers every DNS query with one fixed A record: the query's header and
 * question copied, QR=1 and RA=1, RCODE 0, ANCOUNT=1, NSCOUNT=ARCOUNT=0 (any
 * EDNS record in the query is dropped), then
 *   c0 0c  00 01  00 01  00 00 00 00  00 04  01 02 03 04
 * (the question's name, type A, class IN, TTL 0, 1.2.3.4).
 *
 *   stub udp PORT      a UDP DNS server on 127.0.0.1:PORT (direct and dnsdist)
 *   stub framed PATH   an AF_UNIX stream server at PATH speaking the bbal
 *                      balancer protocol (shared/PROTOCOL.md): CLIENT_HELLO(1)
 *                      -> SERVER_HELLO(1001), CLIENT_HEARTBEAT(4) ->
 *                      SERVER_HEARTBEAT(1004), INBOUND_UDP(2: addr, port, len,
 *                      bytes) -> OUTBOUND_UDP(1002: same addr and port, len,
 *                      answer). Every integer a u32, little-endian. Frames may
 *                      be split across reads and many may come in one read;
 *                      the answers to one read go out in one write. Any number
 *                      of connections at once. INBOUND_TCP (3) is not served:
 *                      that connection is closed.
 *   stub spray PORT COUNT [FIRST_IP]
 *                      a client, not a server: sends one query to
 *                      127.0.0.1:PORT from each of COUNT distinct source
 *                      addresses FIRST_IP, FIRST_IP+1, ... (default 127.1.0.0),
 *                      all from one socket: the source of each datagram is
 *                      chosen with IP_PKTINFO, which any user may do for a
 *                      local address, and every 127/8 address is local. At
 *                      most 256 queries are outstanding; one unanswered for
 *                      200 ms is given up on. Prints
 *                      "sent N answered M ms T" and exits 0.
 *   stub load PORT SECONDS QUERYFILE SOURCES FIRST_IP [MAX_OUTSTANDING]
 *                      a client: the cache scenario's load generator. It
 *                      sends QUERYFILE's queries to 127.0.0.1:PORT for
 *                      SECONDS, round-robin from SOURCES addresses FIRST_IP
 *                      + i (IP_PKTINFO again), at most MAX_OUTSTANDING
 *                      (default 200) at once, and prints one summary line
 *                      (see run_load below).
 *
 * One thread, epoll, level-triggered, nothing allocated per query. SIGTERM
 * and SIGINT end it (the framed server unlinks its socket first).
 * Every address it listens on or sends to is on loopback.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_DNS 1500       /* the protocol's UDP size limit */
#define ANSWER_RR_LEN 16
#define BATCH 64           /* datagrams per recvmmsg/sendmmsg */

static volatile sig_atomic_t stopping = 0;

static void on_signal(int sig)
{
	(void)sig;
	stopping = 1;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		die("fcntl");
}

static void big_buffers(int fd)
{
	int sz = 4 << 20;
	/* FORCE works as root past rmem_max/wmem_max; otherwise fall back. */
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &sz, sizeof(sz)) < 0)
		(void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof(sz));
	if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sz, sizeof(sz)) < 0)
		(void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
}

static void install_signals(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal; /* no SA_RESTART: epoll_wait returns EINTR */
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
}

/*
 * Writes the answer to query q (qlen bytes) into out, which has room for
 * qlen + ANSWER_RR_LEN bytes. Returns the answer's length, or 0 if q is not
 * a query we can answer (short, a response, no single question, a name that
 * runs off the end).
 */
static size_t make_answer(const uint8_t *q, size_t qlen, uint8_t *out)
{
	static const uint8_t rr[ANSWER_RR_LEN] = {
		0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00,
		0x00, 0x00, 0x00, 0x04, 0x01, 0x02, 0x03, 0x04,
	};
	size_t i = 12;

	if (qlen < 12 || qlen > MAX_DNS || (q[2] & 0x80) != 0 || q[4] != 0 || q[5] != 1)
		return 0;
	for (;;) {
		if (i >= qlen)
			return 0;
		uint8_t l = q[i];
		if (l == 0) {
			i += 1;
			break;
		}
		if ((l & 0xc0) == 0xc0) { /* a pointer ends the name */
			i += 2;
			break;
		}
		if ((l & 0xc0) != 0)
			return 0;
		i += 1 + (size_t)l;
	}
	i += 4; /* QTYPE, QCLASS */
	if (i > qlen)
		return 0;
	memcpy(out, q, i);
	out[2] |= 0x80;                   /* QR */
	out[3] = (uint8_t)((out[3] & 0x70) | 0x80); /* RA, keep Z/AD/CD, RCODE 0 */
	out[6] = 0;
	out[7] = 1;                       /* ANCOUNT */
	out[8] = out[9] = out[10] = out[11] = 0; /* NSCOUNT, ARCOUNT */
	memcpy(out + i, rr, ANSWER_RR_LEN);
	return i + ANSWER_RR_LEN;
}

/* ------------------------------------------------------------------ UDP */

static int run_udp(int port)
{
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0)
		die("socket");
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	big_buffers(fd);
	struct sockaddr_in sin;
	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_port = htons((uint16_t)port);
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(fd, (struct sockaddr *)&sin, sizeof(sin)) < 0)
		die("bind");
	set_nonblock(fd);

	int ep = epoll_create1(0);
	struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };
	if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
		die("epoll");

	static uint8_t inbuf[BATCH][MAX_DNS];
	static uint8_t outbuf[BATCH][MAX_DNS + ANSWER_RR_LEN];
	static struct sockaddr_in from[BATCH];
	static struct iovec iin[BATCH], iout[BATCH];
	static struct mmsghdr min[BATCH], mout[BATCH];

	for (int k = 0; k < BATCH; k++) {
		iin[k].iov_base = inbuf[k];
		iin[k].iov_len = MAX_DNS;
		min[k].msg_hdr.msg_iov = &iin[k];
		min[k].msg_hdr.msg_iovlen = 1;
		min[k].msg_hdr.msg_name = &from[k];
	}
	printf("ready udp 127.0.0.1:%d\n", port);
	fflush(stdout);

	while (!stopping) {
		struct epoll_event got;
		int n = epoll_wait(ep, &got, 1, 1000);
		if (n < 0 && errno != EINTR)
			die("epoll_wait");
		if (n <= 0)
			continue;
		for (;;) {
			for (int k = 0; k < BATCH; k++)
				min[k].msg_hdr.msg_namelen = sizeof(from[k]);
			int r = recvmmsg(fd, min, BATCH, MSG_DONTWAIT, NULL);
			if (r <= 0)
				break;
			int m = 0;
			for (int k = 0; k < r; k++) {
				size_t alen = make_answer(inbuf[k], min[k].msg_len, outbuf[m]);
				if (alen == 0)
					continue;
				iout[m].iov_base = outbuf[m];
				iout[m].iov_len = alen;
				memset(&mout[m].msg_hdr, 0, sizeof(mout[m].msg_hdr));
				mout[m].msg_hdr.msg_iov = &iout[m];
				mout[m].msg_hdr.msg_iovlen = 1;
				mout[m].msg_hdr.msg_name = &from[k];
				mout[m].msg_hdr.msg_namelen = min[k].msg_hdr.msg_namelen;
				m++;
			}
			int sent = 0;
			while (sent < m) {
				int s = sendmmsg(fd, mout + sent, (unsigned)(m - sent), 0);
				if (s <= 0)
					break; /* a full send buffer drops, like any DNS server */
				sent += s;
			}
			if (r < BATCH)
				break;
		}
	}
	close(fd);
	return 0;
}

/* --------------------------------------------------------------- framed */

enum {
	CLIENT_HELLO = 1, INBOUND_UDP = 2, INBOUND_TCP = 3, CLIENT_HEARTBEAT = 4,
	SERVER_HELLO = 1001, OUTBOUND_UDP = 1002, SERVER_HEARTBEAT = 1004,
};

#define READ_CHUNK (256 * 1024)
#define OUT_HIGH (8 * 1024 * 1024) /* stop reading while this much is unsent */

struct conn {
	int fd;
	uint8_t *in;
	size_t in_len, in_cap;
	uint8_t *out;
	size_t out_off, out_len, out_cap;
	int want_out; /* EPOLLOUT armed */
};

static uint32_t get_u32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put_u32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
	p[2] = (uint8_t)(v >> 16);
	p[3] = (uint8_t)(v >> 24);
}

static void reserve(uint8_t **buf, size_t *cap, size_t need)
{
	if (need <= *cap)
		return;
	size_t c = *cap ? *cap : 4096;
	while (c < need)
		c *= 2;
	uint8_t *nb = realloc(*buf, c);
	if (nb == NULL)
		die("realloc");
	*buf = nb;
	*cap = c;
}

/* Room for n more bytes at the end of c->out (compacting what was sent). */
static uint8_t *out_room(struct conn *c, size_t n)
{
	if (c->out_off > 0 && c->out_off == c->out_len) {
		c->out_off = c->out_len = 0;
	}
	reserve(&c->out, &c->out_cap, c->out_len + n);
	return c->out + c->out_len;
}

static void close_conn(int ep, struct conn *c)
{
	epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	free(c->in);
	free(c->out);
	free(c);
}

static void update_events(int ep, struct conn *c)
{
	size_t pending = c->out_len - c->out_off;
	int want_out = pending > 0;
	uint32_t evs = (pending >= OUT_HIGH ? 0 : EPOLLIN) | (want_out ? EPOLLOUT : 0);
	struct epoll_event ev = { .events = evs, .data.ptr = c };
	epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
	c->want_out = want_out;
}

/* Write what is pending. Returns -1 if the connection broke. */
static int flush_out(struct conn *c)
{
	while (c->out_off < c->out_len) {
		ssize_t w = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				break;
			return -1;
		}
		c->out_off += (size_t)w;
	}
	if (c->out_off == c->out_len) {
		c->out_off = c->out_len = 0;
	} else if (c->out_off > (1 << 20)) {
		memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
		c->out_len -= c->out_off;
		c->out_off = 0;
	}
	return 0;
}

/*
 * Consume every whole frame in c->in, appending answers to c->out.
 * Returns -1 on a frame we refuse (the connection is then closed).
 */
static int parse_frames(struct conn *c)
{
	size_t p = 0;
	while (c->in_len - p >= 4) {
		const uint8_t *f = c->in + p;
		uint32_t type = get_u32(f);
		if (type == CLIENT_HELLO || type == CLIENT_HEARTBEAT) {
			uint8_t *o = out_room(c, 4);
			put_u32(o, type == CLIENT_HELLO ? SERVER_HELLO : SERVER_HEARTBEAT);
			c->out_len += 4;
			p += 4;
		} else if (type == INBOUND_UDP) {
			if (c->in_len - p < 16)
				break;
			uint32_t len = get_u32(f + 12);
			if (len > 65535)
				return -1;
			if (c->in_len - p < 16 + (size_t)len)
				break;
			uint8_t *o = out_room(c, 16 + (size_t)len + ANSWER_RR_LEN);
			size_t alen = len <= MAX_DNS ? make_answer(f + 16, len, o + 16) : 0;
			if (alen > 0) {
				put_u32(o, OUTBOUND_UDP);
				memcpy(o + 4, f + 4, 8); /* the remote's address and port */
				put_u32(o + 12, (uint32_t)alen);
				c->out_len += 16 + alen;
			}
			p += 16 + (size_t)len;
		} else {
			return -1; /* INBOUND_TCP or anything unknown */
		}
	}
	if (p > 0) {
		memmove(c->in, c->in + p, c->in_len - p);
		c->in_len -= p;
	}
	return 0;
}

/* Readable: read once, answer every whole frame, write the answers at once. */
static void on_readable(int ep, struct conn *c)
{
	reserve(&c->in, &c->in_cap, c->in_len + READ_CHUNK);
	ssize_t r = read(c->fd, c->in + c->in_len, c->in_cap - c->in_len);
	if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
		close_conn(ep, c);
		return;
	}
	if (r < 0)
		return;
	c->in_len += (size_t)r;
	if (parse_frames(c) < 0 || flush_out(c) < 0) {
		close_conn(ep, c);
		return;
	}
	size_t pending = c->out_len - c->out_off;
	if ((pending > 0) != c->want_out || pending >= OUT_HIGH)
		update_events(ep, c);
}

static int run_framed(const char *path)
{
	struct sockaddr_un sun;
	if (strlen(path) >= sizeof(sun.sun_path)) {
		fprintf(stderr, "stub: socket path too long: %s\n", path);
		return 2;
	}
	int lfd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (lfd < 0)
		die("socket");
	memset(&sun, 0, sizeof(sun));
	sun.sun_family = AF_UNIX;
	strcpy(sun.sun_path, path);
	unlink(path);
	if (bind(lfd, (struct sockaddr *)&sun, sizeof(sun)) < 0)
		die("bind");
	if (listen(lfd, 128) < 0)
		die("listen");
	set_nonblock(lfd);

	int ep = epoll_create1(0);
	struct epoll_event ev = { .events = EPOLLIN, .data.ptr = NULL }; /* NULL = listener */
	if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) < 0)
		die("epoll");
	printf("ready framed %s\n", path);
	fflush(stdout);

	struct epoll_event evs[64];
	while (!stopping) {
		int n = epoll_wait(ep, evs, 64, 1000);
		if (n < 0 && errno != EINTR)
			die("epoll_wait");
		for (int k = 0; k < n; k++) {
			struct conn *c = evs[k].data.ptr;
			if (c == NULL) {
				for (;;) {
					int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
					if (fd < 0)
						break;
					big_buffers(fd);
					struct conn *nc = calloc(1, sizeof(*nc));
					if (nc == NULL)
						die("calloc");
					nc->fd = fd;
					struct epoll_event cev = { .events = EPOLLIN, .data.ptr = nc };
					if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev) < 0)
						die("epoll_ctl");
				}
				continue;
			}
			if (evs[k].events & EPOLLOUT) {
				if (flush_out(c) < 0) {
					close_conn(ep, c);
					continue;
				}
				update_events(ep, c);
			}
			if (evs[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
				on_readable(ep, c); /* may free c: nothing after it */
		}
	}
	close(lfd);
	unlink(path);
	return 0;
}

/* ---------------------------------------------------------------- spray */

/*
 * The client socket of spray and load: bound to 0.0.0.0, so the answers to
 * every 127/8 source a datagram is sent from land here; with pktinfo, each
 * received datagram says which of those addresses it was sent to.
 */
static int any_source_socket(int pktinfo)
{
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0)
		die("socket");
	big_buffers(fd);
	int one = 1;
	if (pktinfo && setsockopt(fd, IPPROTO_IP, IP_PKTINFO, &one, sizeof(one)) < 0)
		die("IP_PKTINFO");
	struct sockaddr_in any;
	memset(&any, 0, sizeof(any));
	any.sin_family = AF_INET;
	if (bind(fd, (struct sockaddr *)&any, sizeof(any)) < 0)
		die("bind");
	set_nonblock(fd);
	return fd;
}

/* 127.0.0.1:port, where spray and load send. */
static struct sockaddr_in loopback_port(int port)
{
	struct sockaddr_in dst;
	memset(&dst, 0, sizeof(dst));
	dst.sin_family = AF_INET;
	dst.sin_port = htons((uint16_t)port);
	dst.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return dst;
}

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int run_spray(int port, long count, const char *first)
{
	struct in_addr base;
	if (inet_pton(AF_INET, first, &base) != 1 || (ntohl(base.s_addr) >> 24) != 127) {
		fprintf(stderr, "stub: FIRST_IP must be in 127.0.0.0/8\n");
		return 2;
	}
	uint32_t b = ntohl(base.s_addr);
	if ((uint64_t)b + (uint64_t)count > 0x7fffffffULL) {
		fprintf(stderr, "stub: FIRST_IP + COUNT leaves 127.0.0.0/8\n");
		return 2;
	}
	int fd = any_source_socket(0);
	struct sockaddr_in dst = loopback_port(port);

	/* www.example.com A IN, RD; the id is the low 16 bits of the index. */
	static const uint8_t qtail[] = {
		3, 'w', 'w', 'w', 7, 'e', 'x', 'a', 'm', 'p', 'l', 'e', 3, 'c', 'o', 'm', 0,
		0, 1, 0, 1,
	};
	uint8_t q[12 + sizeof(qtail)];
	memset(q, 0, 12);
	q[2] = 0x01; /* RD */
	q[5] = 1;    /* QDCOUNT */
	memcpy(q + 12, qtail, sizeof(qtail));

	const long window = 256;
	long sent = 0, answered = 0, given_up = 0;
	double start = now_ms(), last_progress = start;
	uint8_t rbuf[MAX_DNS];
	while (!stopping) {
		long outstanding = sent - answered - given_up;
		if (sent == count && outstanding <= 0)
			break;
		while (sent < count && outstanding < window) {
			q[0] = (uint8_t)(sent >> 8);
			q[1] = (uint8_t)sent;
			char cbuf[CMSG_SPACE(sizeof(struct in_pktinfo))];
			memset(cbuf, 0, sizeof(cbuf));
			struct iovec iov = { .iov_base = q, .iov_len = sizeof(q) };
			struct msghdr mh = {
				.msg_name = &dst, .msg_namelen = sizeof(dst),
				.msg_iov = &iov, .msg_iovlen = 1,
				.msg_control = cbuf, .msg_controllen = sizeof(cbuf),
			};
			struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
			cm->cmsg_level = IPPROTO_IP;
			cm->cmsg_type = IP_PKTINFO;
			cm->cmsg_len = CMSG_LEN(sizeof(struct in_pktinfo));
			struct in_pktinfo *pi = (struct in_pktinfo *)CMSG_DATA(cm);
			pi->ipi_spec_dst.s_addr = htonl(b + (uint32_t)sent);
			if (sendmsg(fd, &mh, 0) < 0) {
				if (errno == EAGAIN || errno == ENOBUFS)
					break;
				die("sendmsg");
			}
			sent++;
			outstanding++;
		}
		struct pollfd pfd = { .fd = fd, .events = POLLIN };
		int pr = poll(&pfd, 1, 50);
		if (pr < 0 && errno != EINTR)
			die("poll");
		for (;;) {
			ssize_t r = recv(fd, rbuf, sizeof(rbuf), 0);
			if (r < 0)
				break;
			answered++;
			last_progress = now_ms();
		}
		/* Nothing answered for 200 ms: give up on what is outstanding. */
		if (now_ms() - last_progress > 200) {
			if (sent - answered - given_up > 0)
				given_up = sent - answered;
			last_progress = now_ms();
		}
	}
	printf("sent %ld answered %ld ms %.0f\n", sent, answered, now_ms() - start);
	close(fd);
	return 0;
}

/* ----------------------------------------------------------------- load */

/*
 * stub load PORT SECONDS QUERYFILE SOURCES FIRST_IP [MAX_OUTSTANDING]
 *
 * The cache scenario's load generator: dnsperf's saturation mode, but from
 * many source addresses, since bbal keeps each source on one backend and
 * dnsperf sends from one.  Like spray, it uses one socket bound to 0.0.0.0
 * and picks each datagram's source with IP_PKTINFO; the answers come back
 * to the same socket, and IP_PKTINFO on receipt says which source each was
 * addressed to.
 *
 * THE QUERIES are QUERYFILE's lines, "NAME [TYPE]" (TYPE A when left out;
 * blank lines and lines starting with # skipped), each encoded once at
 * start (RD set, no EDNS) and sent in file order, starting over at the end
 * of the file.  A name whose first label is "*" is asked under a label made
 * afresh for every query: 16 hex digits, a random 32-bit number drawn at
 * start followed by a 32-bit counter, so such a name is never asked twice
 * in a run, nor in two runs, however often the file starts over.  Query n
 * goes from FIRST_IP + (n mod SOURCES): round-robin over the sources.
 *
 * THE WINDOW.  At most MAX_OUTSTANDING (default 200) queries are
 * outstanding for the whole run, like dnsperf's -q: it sends whenever the
 * window has room, in batches (sendmmsg), and reads answers in batches
 * (recvmmsg), so a server is offered as much as it can take.  Query ids
 * come from a FIFO of all 65,536 ids, so an id is reused as late as it can
 * be; an answer counts when its id is outstanding and it was sent to the
 * source that id was asked from (id + source), and only then.  A query
 * unanswered after 1 s is lost, and its id goes back to the FIFO; an
 * answer to it arriving later is a stray, counted apart.  After SECONDS it
 * stops sending and waits up to 1 s for what is outstanding.
 *
 * IT PRINTS one line and exits 0:
 *   sent N answered N lost N rcode_errors N stray N runtime_s S qps Q
 *   p50_us N p99_us N
 * runtime_s is the sending time, qps answers ÷ runtime_s (dnsperf's
 * "Queries per second"), rcode_errors the answers with a non-zero RCODE
 * (counted as answered too, as dnsperf does), and p50/p99 the nearest-rank
 * percentiles of the answered queries' latencies, to the microsecond, from
 * a histogram: one clock read per batch sent and per batch received.
 */

#define LOAD_IDS 65536
#define LOAD_MAX_QUERIES (1 << 20)        /* lines of a query file */
#define LOAD_TIMEOUT_NS 1000000000LL      /* an answer later than this is lost */
#define LOAD_SCAN_NS 100000000LL          /* how often outstanding queries are checked for timeouts */
#define LOAD_HIST_US 1000000              /* latency histogram: 1 µs buckets up to the timeout */
#define LOAD_DEFAULT_WINDOW 200
#define UNIQUE_LABEL_LEN 16

struct load_query {
	uint32_t off;       /* into the encoded queries */
	uint16_t len;
	uint16_t unique_at; /* offset of the fresh label's 16 bytes; 0: none */
};

struct load_slot {
	int64_t sent_ns;
	uint32_t src;       /* index of the source address */
	uint8_t busy;
};

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The type number of a mnemonic; 0 if unknown. */
static int qtype_of(const char *t)
{
	static const struct { const char *name; int num; } types[] = {
		{ "A", 1 }, { "NS", 2 }, { "CNAME", 5 }, { "SOA", 6 }, { "PTR", 12 }, { "MX", 15 },
		{ "TXT", 16 }, { "AAAA", 28 }, { "SRV", 33 }, { "ANY", 255 },
	};
	for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
		if (strcasecmp(t, types[i].name) == 0)
			return types[i].num;
	return 0;
}

/*
 * Encode "NAME TYPE" as a query (id 0, RD) at out, which has MAX_DNS bytes.
 * Returns its length, 0 for a line that is not a query; *unique_at is set
 * to where the fresh label goes when the first label is "*".
 */
static size_t encode_query(char *line, uint8_t *out, uint16_t *unique_at)
{
	char *save = NULL;
	char *name = strtok_r(line, " \t\r\n", &save);
	char *type = strtok_r(NULL, " \t\r\n", &save);
	int qt = type ? qtype_of(type) : 1;
	if (name == NULL || qt == 0)
		return 0;
	memset(out, 0, 12);
	out[2] = 0x01; /* RD */
	out[5] = 1;    /* QDCOUNT */
	size_t i = 12;
	*unique_at = 0;
	for (char *label = name; *label != '\0';) {
		char *dot = strchr(label, '.');
		size_t l = dot ? (size_t)(dot - label) : strlen(label);
		if (l == 0 && dot) /* "a..b" */
			return 0;
		if (i == 12 && l == 1 && label[0] == '*') {
			*unique_at = (uint16_t)(i + 1);
			l = UNIQUE_LABEL_LEN;
			out[i] = (uint8_t)l;
			memset(out + i + 1, '0', l);
		} else {
			if (l > 63)
				return 0;
			out[i] = (uint8_t)l;
			memcpy(out + i + 1, label, l);
		}
		i += 1 + l;
		if (i > 12 + 253)
			return 0;
		if (!dot)
			break;
		label = dot + 1;
	}
	out[i++] = 0;
	out[i++] = (uint8_t)(qt >> 8);
	out[i++] = (uint8_t)qt;
	out[i++] = 0;
	out[i++] = 1; /* IN */
	return i;
}

/* The query file, encoded; exits on an unreadable or empty file. */
static struct load_query *load_queries(const char *file, uint8_t **wire, long *count)
{
	FILE *f = fopen(file, "r");
	if (f == NULL)
		die(file);
	struct load_query *qs = calloc(LOAD_MAX_QUERIES, sizeof(*qs));
	size_t cap = 1 << 20, used = 0;
	uint8_t *buf = malloc(cap);
	if (qs == NULL || buf == NULL)
		die("malloc");
	char line[1024];
	long n = 0;
	while (fgets(line, sizeof(line), f) != NULL && n < LOAD_MAX_QUERIES) {
		if (line[0] == '#' || line[0] == '\n')
			continue;
		reserve(&buf, &cap, used + MAX_DNS);
		uint16_t unique_at;
		size_t len = encode_query(line, buf + used, &unique_at);
		if (len == 0)
			continue;
		qs[n].off = (uint32_t)used;
		qs[n].len = (uint16_t)len;
		qs[n].unique_at = unique_at;
		used += len;
		n++;
	}
	fclose(f);
	if (n == 0) {
		fprintf(stderr, "stub: no queries in %s\n", file);
		exit(2);
	}
	*wire = buf;
	*count = n;
	return qs;
}

/* A random 32-bit number for the fresh labels of this run. */
static uint32_t run_nonce(void)
{
	uint32_t v = 0;
	FILE *f = fopen("/dev/urandom", "r");
	if (f == NULL || fread(&v, sizeof(v), 1, f) != 1)
		v = (uint32_t)now_ns() ^ (uint32_t)getpid() << 16;
	if (f != NULL)
		fclose(f);
	return v;
}

/* The nearest-rank percentile p (0-1) of the histogram's n samples, in µs. */
static long hist_percentile(const uint32_t *hist, long n, double p)
{
	if (n == 0)
		return -1;
	long rank = (long)((double)n * p);
	if ((double)rank < (double)n * p)
		rank++;
	if (rank < 1)
		rank = 1;
	long seen = 0;
	for (long us = 0; us < LOAD_HIST_US; us++) {
		seen += hist[us];
		if (seen >= rank)
			return us;
	}
	return LOAD_HIST_US - 1;
}

static int run_load(int port, double seconds, const char *file, long sources, const char *first, long window)
{
	struct in_addr base;
	if (inet_pton(AF_INET, first, &base) != 1 || (ntohl(base.s_addr) >> 24) != 127) {
		fprintf(stderr, "stub: FIRST_IP must be in 127.0.0.0/8\n");
		return 2;
	}
	uint32_t b = ntohl(base.s_addr);
	if (sources < 1 || sources > 65536 || (uint64_t)b + (uint64_t)sources > 0x80000000ULL) {
		fprintf(stderr, "stub: SOURCES must be 1-65536 and FIRST_IP + SOURCES within 127.0.0.0/8\n");
		return 2;
	}
	if (window < 1 || window > LOAD_IDS / 2 || !(seconds > 0 && seconds <= 3600)) {
		fprintf(stderr, "stub: MAX_OUTSTANDING must be 1-%d and SECONDS 0-3600\n", LOAD_IDS / 2);
		return 2;
	}
	uint8_t *wire;
	long nq;
	struct load_query *qs = load_queries(file, &wire, &nq);

	int fd = any_source_socket(1);
	struct sockaddr_in dst = loopback_port(port);

	static struct load_slot slots[LOAD_IDS];
	static uint16_t free_ids[LOAD_IDS]; /* a FIFO ring, always LOAD_IDS - outstanding long */
	static uint32_t hist[LOAD_HIST_US];
	static uint8_t sbuf[BATCH][MAX_DNS], rbuf[BATCH][MAX_DNS];
	static char sctl[BATCH][CMSG_SPACE(sizeof(struct in_pktinfo))];
	static char rctl[BATCH][CMSG_SPACE(sizeof(struct in_pktinfo)) + 64];
	static struct sockaddr_in rfrom[BATCH];
	static struct iovec siov[BATCH], riov[BATCH];
	static struct mmsghdr smsg[BATCH], rmsg[BATCH];
	static uint16_t sid[BATCH];
	uint32_t fhead = 0, ffree = LOAD_IDS;
	for (uint32_t i = 0; i < LOAD_IDS; i++)
		free_ids[i] = (uint16_t)i;
	for (int k = 0; k < BATCH; k++) {
		siov[k].iov_base = sbuf[k];
		smsg[k].msg_hdr.msg_name = &dst;
		smsg[k].msg_hdr.msg_namelen = sizeof(dst);
		smsg[k].msg_hdr.msg_iov = &siov[k];
		smsg[k].msg_hdr.msg_iovlen = 1;
		smsg[k].msg_hdr.msg_control = sctl[k];
		smsg[k].msg_hdr.msg_controllen = sizeof(sctl[k]);
		memset(sctl[k], 0, sizeof(sctl[k]));
		struct cmsghdr *cm = CMSG_FIRSTHDR(&smsg[k].msg_hdr);
		cm->cmsg_level = IPPROTO_IP;
		cm->cmsg_type = IP_PKTINFO;
		cm->cmsg_len = CMSG_LEN(sizeof(struct in_pktinfo));
		riov[k].iov_base = rbuf[k];
		riov[k].iov_len = MAX_DNS;
		rmsg[k].msg_hdr.msg_iov = &riov[k];
		rmsg[k].msg_hdr.msg_iovlen = 1;
		rmsg[k].msg_hdr.msg_name = &rfrom[k];
	}

	const uint32_t nonce = run_nonce();
	uint32_t unique_seq = 0;
	long next_q = 0, sent = 0, answered = 0, lost = 0, rcode_errors = 0, stray = 0, outstanding = 0;
	const int64_t start = now_ns();
	const int64_t send_end = start + (int64_t)(seconds * 1e9);
	int64_t next_scan = start + LOAD_SCAN_NS, sending_until = send_end;
	int sending = 1;
	while (!stopping) {
		int64_t now = now_ns();
		if (sending && now >= send_end) {
			sending = 0;
			sending_until = now;
		}
		if (!sending && (outstanding == 0 || now >= sending_until + LOAD_TIMEOUT_NS))
			break;
		int progress = 0, send_blocked = 0;

		/* Fill the window, a batch at a time. */
		while (sending && outstanding < window) {
			int m = (int)(window - outstanding < BATCH ? window - outstanding : BATCH);
			for (int k = 0; k < m; k++) {
				const struct load_query *q = &qs[next_q];
				uint8_t *p = sbuf[k];
				memcpy(p, wire + q->off, q->len);
				uint16_t id = free_ids[fhead];
				fhead = (fhead + 1) % LOAD_IDS;
				ffree--;
				p[0] = (uint8_t)(id >> 8);
				p[1] = (uint8_t)id;
				if (q->unique_at != 0) {
					static const char hex[] = "0123456789abcdef";
					uint64_t v = (uint64_t)nonce << 32 | unique_seq++;
					for (int d = UNIQUE_LABEL_LEN - 1; d >= 0; d--, v >>= 4)
						p[q->unique_at + d] = (uint8_t)hex[v & 15];
				}
				siov[k].iov_len = q->len;
				uint32_t src = (uint32_t)((sent + k) % sources);
				struct in_pktinfo *pi = (struct in_pktinfo *)CMSG_DATA(CMSG_FIRSTHDR(&smsg[k].msg_hdr));
				pi->ipi_spec_dst.s_addr = htonl(b + src);
				slots[id].sent_ns = now;
				slots[id].src = src;
				slots[id].busy = 1;
				sid[k] = id;
				next_q = next_q + 1 == nq ? 0 : next_q + 1;
			}
			int s = sendmmsg(fd, smsg, (unsigned)m, 0);
			if (s < 0) {
				if (errno != EAGAIN && errno != ENOBUFS && errno != EINTR)
					die("sendmmsg");
				s = 0;
			}
			/* What was not sent gives its ids back (to the FIFO's tail: ids stay unique). */
			for (int k = s; k < m; k++) {
				slots[sid[k]].busy = 0;
				free_ids[(fhead + ffree) % LOAD_IDS] = sid[k];
				ffree++;
			}
			sent += s;
			outstanding += s;
			if (s > 0)
				progress = 1;
			if (s < m) {
				send_blocked = 1;
				break;
			}
		}

		/* Every answer waiting, a batch at a time. */
		for (;;) {
			for (int k = 0; k < BATCH; k++) {
				rmsg[k].msg_hdr.msg_namelen = sizeof(rfrom[k]);
				rmsg[k].msg_hdr.msg_control = rctl[k];
				rmsg[k].msg_hdr.msg_controllen = sizeof(rctl[k]);
			}
			int r = recvmmsg(fd, rmsg, BATCH, MSG_DONTWAIT, NULL);
			if (r <= 0)
				break;
			progress = 1;
			int64_t t = now_ns();
			for (int k = 0; k < r; k++) {
				const uint8_t *a = rbuf[k];
				if (rmsg[k].msg_len < 12 || (a[2] & 0x80) == 0) {
					stray++;
					continue;
				}
				uint16_t id = (uint16_t)(a[0] << 8 | a[1]);
				uint32_t to = 0;
				for (struct cmsghdr *cm = CMSG_FIRSTHDR(&rmsg[k].msg_hdr); cm != NULL;
				     cm = CMSG_NXTHDR(&rmsg[k].msg_hdr, cm)) {
					if (cm->cmsg_level == IPPROTO_IP && cm->cmsg_type == IP_PKTINFO)
						to = ntohl(((struct in_pktinfo *)CMSG_DATA(cm))->ipi_addr.s_addr);
				}
				struct load_slot *sl = &slots[id];
				if (!sl->busy || to != b + sl->src) {
					stray++;
					continue;
				}
				int64_t us = (t - sl->sent_ns) / 1000;
				hist[us < 0 ? 0 : us >= LOAD_HIST_US ? LOAD_HIST_US - 1 : us]++;
				answered++;
				if ((a[3] & 0x0f) != 0)
					rcode_errors++;
				sl->busy = 0;
				free_ids[(fhead + ffree) % LOAD_IDS] = id;
				ffree++;
				outstanding--;
			}
			if (r < BATCH)
				break;
		}

		/* Queries unanswered for a second are lost. */
		now = now_ns();
		if (now >= next_scan) {
			next_scan = now + LOAD_SCAN_NS;
			for (uint32_t id = 0; id < LOAD_IDS && outstanding > 0; id++) {
				if (slots[id].busy && now - slots[id].sent_ns >= LOAD_TIMEOUT_NS) {
					slots[id].busy = 0;
					free_ids[(fhead + ffree) % LOAD_IDS] = (uint16_t)id;
					ffree++;
					outstanding--;
					lost++;
				}
			}
		}
		if (!progress) {
			struct pollfd pfd = { .fd = fd, .events = POLLIN | (send_blocked ? POLLOUT : 0) };
			if (poll(&pfd, 1, 10) < 0 && errno != EINTR)
				die("poll");
		}
	}
	lost += outstanding; /* still unanswered at the end (or at a signal) */
	double runtime = (double)(sending_until - start) / 1e9;
	printf("sent %ld answered %ld lost %ld rcode_errors %ld stray %ld runtime_s %.3f qps %.1f p50_us %ld p99_us %ld\n",
	       sent, answered, lost, rcode_errors, stray, runtime, runtime > 0 ? (double)answered / runtime : 0.0,
	       hist_percentile(hist, answered, 0.50), hist_percentile(hist, answered, 0.99));
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	install_signals();
	if (argc == 3 && strcmp(argv[1], "udp") == 0)
		return run_udp(atoi(argv[2]));
	if (argc == 3 && strcmp(argv[1], "framed") == 0)
		return run_framed(argv[2]);
	if ((argc == 4 || argc == 5) && strcmp(argv[1], "spray") == 0)
		return run_spray(atoi(argv[2]), atol(argv[3]), argc == 5 ? argv[4] : "127.1.0.0");
	if ((argc == 7 || argc == 8) && strcmp(argv[1], "load") == 0)
		return run_load(atoi(argv[2]), atof(argv[3]), argv[4], atol(argv[5]), argv[6],
				argc == 8 ? atol(argv[7]) : LOAD_DEFAULT_WINDOW);
	fprintf(stderr, "usage: stub udp PORT | stub framed PATH | stub spray PORT COUNT [FIRST_IP]\n"
		"       stub load PORT SECONDS QUERYFILE SOURCES FIRST_IP [MAX_OUTSTANDING]\n");
	return 2;
}
