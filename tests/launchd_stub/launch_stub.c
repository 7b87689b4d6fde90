/*
 * A stand-in for macOS's launch_activate_socket(3), so handoff/_launchd.py's ctypes binding can be
 * tested on Linux. Built by tests/integration/test_launchd.py with the system cc into a temp dir:
 *
 *     cc -shared -fPIC -Wall -Werror -o liblaunch_stub.so launch_stub.c
 *
 * Same signature and ownership rules as launchd's: on success the array of fds is malloc'd and the
 * caller owns it (and the fds); on failure an errno value is returned and nothing is allocated:
 * ENOENT for a name the "plist" does not declare, ESRCH when the process is "not managed by
 * launchd", EALREADY for a name activated before.
 *
 * Like launchd, the stub binds the sockets itself (TCP, 127.0.0.1, an ephemeral port, listening),
 * so the test can check that the fds it gets back are real sockets bound where the stub says.
 * stub_free() stands in for free(3): it checks that the pointer is one the stub handed out and not
 * yet released, counts, then frees. The test asserts no array is outstanding and none was freed
 * wrongly, which is what ASan/valgrind would otherwise tell (they cannot run inside CPython here).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_NAMES 8
#define MAX_FDS_PER_NAME 4
#define MAX_ARRAYS 64

struct declared {
    char name[64];
    size_t count;      /* sockets to bind on activation */
    int activated;
    int ports[MAX_FDS_PER_NAME];
};

static struct declared declared[MAX_NAMES];
static size_t n_declared;
static int managed = 1;
static void *outstanding[MAX_ARRAYS];
static int frees, bad_frees, activations;

void stub_reset(void) {
    memset(declared, 0, sizeof declared);
    n_declared = 0;
    managed = 1;
    memset(outstanding, 0, sizeof outstanding);
    frees = bad_frees = activations = 0;
}

/* Declare a Sockets entry: activating `name` yields `count` listening TCP sockets. */
int stub_declare(const char *name, size_t count) {
    if (n_declared == MAX_NAMES || count > MAX_FDS_PER_NAME || strlen(name) >= sizeof declared[0].name)
        return -1;
    strcpy(declared[n_declared].name, name);
    declared[n_declared].count = count;
    n_declared++;
    return 0;
}

void stub_set_managed(int value) { managed = value; }

/* The port the i-th socket of `name` was bound to, or -1. */
int stub_port(const char *name, size_t i) {
    for (size_t k = 0; k < n_declared; k++)
        if (strcmp(declared[k].name, name) == 0 && declared[k].activated && i < declared[k].count)
            return declared[k].ports[i];
    return -1;
}

int stub_outstanding(void) {
    int n = 0;
    for (size_t k = 0; k < MAX_ARRAYS; k++)
        n += outstanding[k] != NULL;
    return n;
}
int stub_frees(void) { return frees; }
int stub_bad_frees(void) { return bad_frees; }
int stub_activations(void) { return activations; }

void stub_free(void *ptr) {
    for (size_t k = 0; k < MAX_ARRAYS; k++) {
        if (ptr != NULL && outstanding[k] == ptr) {
            outstanding[k] = NULL;
            frees++;
            free(ptr);
            return;
        }
    }
    bad_frees++; /* not ours, or freed twice: leak it rather than corrupt the heap */
}

static int bind_listener(int *port) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    int fd = socket(AF_INET, SOCK_STREAM, 0); /* inheritable, as launchd hands them over */
    if (fd < 0)
        return -1;
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 16) < 0 ||
        getsockname(fd, (struct sockaddr *)&addr, &len) < 0) {
        close(fd);
        return -1;
    }
    *port = ntohs(addr.sin_port);
    return fd;
}

int launch_activate_socket(const char *name, int **fds, size_t *cnt) {
    struct declared *d = NULL;
    if (!managed)
        return ESRCH;
    for (size_t k = 0; k < n_declared; k++)
        if (strcmp(declared[k].name, name) == 0)
            d = &declared[k];
    if (d == NULL)
        return ENOENT;
    if (d->activated)
        return EALREADY;

    size_t slot = 0;
    while (slot < MAX_ARRAYS && outstanding[slot] != NULL)
        slot++;
    int *array = malloc(d->count * sizeof(int));
    if (slot == MAX_ARRAYS || array == NULL) {
        free(array);
        return ENOMEM;
    }
    for (size_t i = 0; i < d->count; i++) {
        array[i] = bind_listener(&d->ports[i]);
        if (array[i] < 0) {
            int saved = errno;
            while (i-- > 0)
                close(array[i]);
            free(array);
            return saved;
        }
    }
    d->activated = 1;
    outstanding[slot] = array;
    activations++;
    *fds = array;
    *cnt = d->count;
    return 0;
}
