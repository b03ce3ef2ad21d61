/* toolq's network shim: every TCP connection a sandboxed tool opens goes through the
 * worker's egress proxy, for clients that do not honour HTTP(S)_PROXY (Bun.connect,
 * node:net, node:http and https, and so database drivers, axios's Node adapter, got).
 *
 * Preloaded into Bun (bwrap --setenv LD_PRELOAD) only in a sandbox with an `--allow-net`
 * grant. Such a sandbox has no network of its own: this shim is a route, not a guard.
 * What a tool may reach is decided by the egress proxy outside the sandbox; a tool that
 * goes around the shim (its own syscalls, through --allow-ffi) reaches nothing.
 *
 * - getaddrinfo(name): the sandbox cannot resolve names, and the proxy must see them (it
 *   resolves and checks every address itself). A name gets a placeholder address in
 *   240.0.0.0/4 (reserved, never routed), remembered here; numeric hosts and localhost
 *   resolve as usual.
 * - connect(): a TCP connection to anything but the sandbox's own loopback is made to
 *   the proxy's unix socket (bound into the sandbox; not the wrapper's relay, which runs
 *   on the event loop this call may be blocking): the shim sends `CONNECT host:port` (the
 *   name for a placeholder), reads the answer, and puts the tunnel in place of the
 *   caller's socket (dup3). A refusal is ECONNREFUSED, its reason written to stderr. The
 *   handshake blocks the calling thread (at most the proxy's connect timeout).
 *
 * Built by `make setup` (cc -shared); without it, raw sockets have no route at all.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define TOOLQ_EGRESS_SOCKET "/tmp/.toolq-egress/egress.sock" /* sandbox.py: EGRESS_DIR */
#define MAX_NAMES 65536
#define HANDSHAKE_TIMEOUT_MS 15000

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static char *names[MAX_NAMES]; /* placeholder 240.0.0.0 + i -> name */
static unsigned count;

struct ours {
    struct addrinfo info;
    struct sockaddr_in6 addr;
    struct ours *next;
};
static struct ours *allocated; /* ours, so freeaddrinfo knows which to free itself */

typedef int (*getaddrinfo_fn)(const char *, const char *, const struct addrinfo *,
                              struct addrinfo **);
typedef void (*freeaddrinfo_fn)(struct addrinfo *);
typedef int (*connect_fn)(int, const struct sockaddr *, socklen_t);

static int real_connect(int fd, const struct sockaddr *addr, socklen_t len) {
    static connect_fn real;
    if (!real) real = (connect_fn)dlsym(RTLD_NEXT, "connect");
    return real(fd, addr, len);
}

static int numeric(const char *host) {
    unsigned char buffer[sizeof(struct in6_addr)];
    return inet_pton(AF_INET, host, buffer) == 1 || inet_pton(AF_INET6, host, buffer) == 1;
}

static int placeholder_for(const char *name, uint32_t *out) {
    pthread_mutex_lock(&lock);
    for (unsigned i = 0; i < count; i++) {
        if (strcasecmp(names[i], name) == 0) {
            pthread_mutex_unlock(&lock);
            *out = 0xF0000000u + i;
            return 0;
        }
    }
    if (count >= MAX_NAMES) {
        pthread_mutex_unlock(&lock);
        return -1;
    }
    names[count] = strdup(name);
    *out = 0xF0000000u + count;
    count++;
    pthread_mutex_unlock(&lock);
    return 0;
}

static const char *name_of(uint32_t address) {
    uint32_t index = address - 0xF0000000u;
    const char *name = NULL;
    pthread_mutex_lock(&lock);
    if (address >= 0xF0000000u && index < count) name = names[index];
    pthread_mutex_unlock(&lock);
    return name;
}

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res) {
    static getaddrinfo_fn real;
    if (!real) real = (getaddrinfo_fn)dlsym(RTLD_NEXT, "getaddrinfo");
    int family = hints ? hints->ai_family : AF_UNSPEC;
    if (node == NULL || numeric(node) || strcasecmp(node, "localhost") == 0 ||
        (hints && (hints->ai_flags & AI_NUMERICHOST)) ||
        (family != AF_UNSPEC && family != AF_INET && family != AF_INET6))
        return real(node, service, hints, res);
    char *end = NULL;
    long port = service ? strtol(service, &end, 10) : 0;
    if (service && (*end != '\0' || port < 0 || port > 65535)) {
        struct servent *known = getservbyname(service, "tcp");
        if (!known) return EAI_SERVICE;
        port = ntohs((uint16_t)known->s_port);
    }
    uint32_t address;
    if (placeholder_for(node, &address) != 0) return EAI_MEMORY;
    struct ours *entry = calloc(1, sizeof *entry);
    if (!entry) return EAI_MEMORY;
    entry->info.ai_socktype = hints && hints->ai_socktype ? hints->ai_socktype : SOCK_STREAM;
    entry->info.ai_protocol = hints ? hints->ai_protocol : 0;
    if (family == AF_INET6) { /* ::ffff:240.x.y.z */
        entry->addr.sin6_family = AF_INET6;
        entry->addr.sin6_port = htons((uint16_t)port);
        entry->addr.sin6_addr.s6_addr[10] = 0xff;
        entry->addr.sin6_addr.s6_addr[11] = 0xff;
        uint32_t network = htonl(address);
        memcpy(&entry->addr.sin6_addr.s6_addr[12], &network, 4);
        entry->info.ai_family = AF_INET6;
        entry->info.ai_addrlen = sizeof(struct sockaddr_in6);
    } else {
        struct sockaddr_in *v4 = (struct sockaddr_in *)&entry->addr;
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        v4->sin_addr.s_addr = htonl(address);
        entry->info.ai_family = AF_INET;
        entry->info.ai_addrlen = sizeof(struct sockaddr_in);
    }
    entry->info.ai_addr = (struct sockaddr *)&entry->addr;
    pthread_mutex_lock(&lock);
    entry->next = allocated;
    allocated = entry;
    pthread_mutex_unlock(&lock);
    *res = &entry->info;
    return 0;
}

void freeaddrinfo(struct addrinfo *info) {
    static freeaddrinfo_fn real;
    if (!real) real = (freeaddrinfo_fn)dlsym(RTLD_NEXT, "freeaddrinfo");
    pthread_mutex_lock(&lock);
    for (struct ours **at = &allocated; *at; at = &(*at)->next) {
        if (&(*at)->info == info) {
            struct ours *entry = *at;
            *at = entry->next;
            pthread_mutex_unlock(&lock);
            free(entry);
            return;
        }
    }
    pthread_mutex_unlock(&lock);
    real(info);
}

/* The destination as the proxy should see it ("name:port", "1.2.3.4:port",
 * "[v6]:port"), or 0 for the sandbox's own loopback (left alone). */
static int target_of(const struct sockaddr *addr, char *out, size_t size) {
    char host[INET6_ADDRSTRLEN];
    uint16_t port;
    uint32_t v4;
    if (addr->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)addr;
        v4 = ntohl(in->sin_addr.s_addr);
        port = ntohs(in->sin_port);
    } else {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)addr;
        port = ntohs(in6->sin6_port);
        if (IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr)) return 0;
        if (!IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
            inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
            snprintf(out, size, "[%s]:%u", host, port);
            return 1;
        }
        memcpy(&v4, &in6->sin6_addr.s6_addr[12], 4);
        v4 = ntohl(v4);
    }
    if ((v4 >> 24) == 127) return 0;
    const char *name = name_of(v4);
    if (name) {
        snprintf(out, size, "%s:%u", name, port);
        return 1;
    }
    struct in_addr network = {htonl(v4)};
    inet_ntop(AF_INET, &network, host, sizeof host);
    snprintf(out, size, "%s:%u", host, port);
    return 1;
}

static void say(const char *target, const char *why) {
    char line[1024];
    int n = snprintf(line, sizeof line, "toolq: connection to %s refused: %s\n", target, why);
    if (n > 0) (void)!write(2, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

/* A tunnel to `target` through the relay: a connected blocking fd, or -1 with errno. */
static int tunnel(const char *target) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    struct sockaddr_un proxy = {.sun_family = AF_UNIX};
    strncpy(proxy.sun_path, TOOLQ_EGRESS_SOCKET, sizeof proxy.sun_path - 1);
    if (real_connect(fd, (struct sockaddr *)&proxy, sizeof proxy) != 0) {
        close(fd);
        say(target, "no egress proxy in this sandbox");
        errno = ENETUNREACH;
        return -1;
    }
    char request[600];
    int length = snprintf(request, sizeof request, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n",
                          target, target);
    if (length <= 0 || (size_t)length >= sizeof request ||
        send(fd, request, (size_t)length, MSG_NOSIGNAL) != length) {
        close(fd);
        errno = ECONNREFUSED;
        return -1;
    }
    /* Read the answer's head byte by byte: nothing of the tunnel's data is consumed. */
    char head[2048];
    size_t got = 0;
    while (got < sizeof head - 1) {
        struct pollfd wait = {.fd = fd, .events = POLLIN};
        if (poll(&wait, 1, HANDSHAKE_TIMEOUT_MS) <= 0) break;
        ssize_t n = recv(fd, head + got, 1, 0);
        if (n <= 0) break;
        got++;
        if (got >= 4 && memcmp(head + got - 4, "\r\n\r\n", 4) == 0) break;
    }
    head[got] = '\0';
    if (strncmp(head, "HTTP/1.1 200", 12) == 0 || strncmp(head, "HTTP/1.0 200", 12) == 0) return fd;
    close(fd);
    char *line_end = strstr(head, "\r\n");
    if (line_end) *line_end = '\0';
    say(target, got ? head + (strlen(head) > 13 ? 13 : 0) : "no answer from the egress proxy");
    errno = strncmp(head, "HTTP/1.1 502", 12) == 0 ? EHOSTUNREACH : ECONNREFUSED;
    return -1;
}

int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    int type = 0;
    socklen_t type_len = sizeof type;
    char target[512];
    if (addr == NULL || (addr->sa_family != AF_INET && addr->sa_family != AF_INET6) ||
        getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &type_len) != 0 || type != SOCK_STREAM ||
        !target_of(addr, target, sizeof target))
        return real_connect(fd, addr, len);
    int flags = fcntl(fd, F_GETFL);
    int descriptor_flags = fcntl(fd, F_GETFD);
    int through = tunnel(target);
    if (through < 0) return -1;
    if (flags >= 0) fcntl(through, F_SETFL, flags);
    /* The tunnel takes the caller's fd number (dup3 keeps its close-on-exec flag). */
    int kept = dup3(through, fd, descriptor_flags >= 0 && (descriptor_flags & FD_CLOEXEC) ? O_CLOEXEC : 0);
    int saved = errno;
    close(through);
    if (kept < 0) {
        errno = saved;
        return -1;
    }
    return 0;
}
