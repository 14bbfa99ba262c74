# The C side of the compiled UDP path (_fastpath.pyx): the system and
# CPython calls it makes, its fixed sizes, and the indexes of its counters.
# Sizes that the Python path has too (BATCH, the slot size, the stale errnos,
# the RTT gains) are not here: the module reads them from the Python modules
# at import.
from cpython.ref cimport PyObject
from posix.uio cimport iovec
from posix.time cimport itimerspec

cdef extern from "Python.h":
    PyObject *PyDict_SetDefault(object d, object key, object default) except NULL
    # What a dict hashes bytes with: keyed SipHash, so that nobody outside can
    # choose names that fall into one set of the route cache.
    Py_hash_t _Py_HashBytes(const void *data, Py_ssize_t n) nogil
    void Py_INCREF(PyObject *o)
    void Py_XDECREF(PyObject *o)

cdef extern from "<sys/random.h>" nogil:
    ssize_t getrandom(void *buf, size_t n, unsigned int flags)

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    cdef struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    cdef struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int recvmmsg(int fd, mmsghdr *vec, unsigned int n, int flags, void *timeout)
    int sendmmsg(int fd, mmsghdr *vec, unsigned int n, int flags)
    ssize_t sendto(int fd, const void *buf, size_t n, int flags, const void *addr, socklen_t len)
    enum: MSG_WAITFORONE
    enum: MSG_DONTWAIT
    enum: AF_INET
    enum: AF_INET6

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        unsigned int u32
    cdef struct epoll_event:
        unsigned int events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum: EPOLL_CLOEXEC
    enum: EPOLL_CTL_ADD
    enum: EPOLL_CTL_DEL
    enum: EPOLLIN
    enum: EPOLLERR

cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    ssize_t read(int fd, void *buf, size_t n)

cdef extern from "<sys/timerfd.h>" nogil:
    int timerfd_create(int clockid, int flags)
    int timerfd_settime(int fd, int flags, const itimerspec *new_value, itimerspec *old_value)
    enum: TFD_CLOEXEC
    enum: TFD_NONBLOCK

cdef enum:
    NAME = 28  # room for a peer address: sizeof(struct sockaddr_in6)
    KEY = 260  # a question, lower-cased: a name of at most 255 bytes, its type and class
    OUT = 256  # datagrams an Outbox holds before it sends on its own (and the most mmsg.BATCH may be)
    IDS = 4096  # random IDs drawn from the kernel at a time
    SETS = 4096  # the route cache: SETS x WAYS questions (a power of two)
    WAYS = 4
    ERRNOS = 256  # room in the table of stale errnos (Linux's errnos are below 134)
    RCODES = 16  # the header's 4 bits
    BUCKETS = 32  # room for len(control.LATENCY_BUCKETS) + 1
    BACKENDS = 1024  # backends one thread counts in C; past them (months of churn) its dict counts
    SOURCES = 64  # sockets one loop serves at most
    CLIENT = SOURCES  # the epoll tag of the listening socket
    TIMER = SOURCES + 1  # the epoll tag of the clocks' timer

cdef enum:  # the counters with a fixed key: indexes into Counters.fixed and _FIXED_KEYS
    SHORT = 0
    UNKNOWN, WRONG_SOURCE, WRONG_QUESTION, IN_FLIGHT, ERROR, QUERIES
    DROPPED_SHORT, DROPPED_RESPONSE, DROPPED_ACL  # dropped{short, response, acl}: what _decide drops
    FIXED

cdef enum:  # why a query goes to the Python path: indexes into Counters.handoffs and HANDOFF_REASONS
    QUERY_LOG = 0  # [log] queries is on: a query to route is logged there
    NOTIFY_ALLOWED  # a NOTIFY from [cache] notify_allow: the purge
    CLIENT_ADDRESS  # a pool member takes PROXY or ECS
    REASONS

cdef enum:  # what _decide makes of a datagram: _Verdict.action
    FORWARD = 0  # a query to route: its question lower-cased in the key, its end in _Verdict.end
    DROP  # dropped: _Verdict.reason is the counter (DROPPED_SHORT, DROPPED_RESPONSE, DROPPED_ACL)
    ANSWER  # the router's own answer (_own_answer): _Verdict.rcode, end, echo
    TO_PYTHON  # Forwarder.handle decides: _Verdict.reason is the handoff reason

cdef struct _Verdict:
    int action
    int reason
    int rcode
    int end  # where the question ends as wire.parse_question reads it; 0: it does not parse
    bint echo  # ANSWER: the question is echoed

cdef struct _Net:  # one network of a Networks: the address masked to its prefix
    int family  # 4 or 6
    int prefix  # bits
    unsigned char address[16]  # 4 bytes used for IPv4

cdef struct _Networks:
    Py_ssize_t count
    _Net *nets

cdef struct _Policy:  # what _decide reads of the forwarder's settings
    const _Networks *allow  # [server] allow; NULL: everyone
    bint drop_denied  # [server] deny_action = drop
    const _Networks *notify  # [cache] notify_allow (empty: nobody)

cdef struct _Way:
    Py_hash_t hash
    PyObject *question  # bytes, owned; NULL: an empty way
    PyObject *pool  # owned: a Pool, or None (no route)

# -- the packet cache (PacketCache, dnsrouter/cache.py's rules in C) -----------

cdef extern from *:
    """
    /* The purge log's sequence number, written by other processes: one load. */
    static inline unsigned long long dnsrouter_load_seq(const void *p) {
        return __atomic_load_n((const unsigned long long *)p, __ATOMIC_ACQUIRE);
    }
    """
    unsigned long long _load_seq "dnsrouter_load_seq" (const void *p) nogil

cdef enum:
    CACHE_KEY = 512  # room for a cache key: cache.MAX_KEY at most (checked at import)
    CACHE_ANSWER = 65536  # room for an answer: one is served only up to 65535 bytes (TCP's most)
    CACHE_CHUNK = 16  # what glibc's malloc adds to a block, on average: its 8-byte size word, rounding to 16

cdef struct _QueryEdns:  # cache._Edns: the OPT of a cacheable query, as key and answer read it
    bint edns  # False: no OPT (_NO_EDNS)
    Py_ssize_t payload  # what the client can take over UDP (at least 512)
    Py_ssize_t cookie_size  # the bytes of its COOKIE option (4 + its length), 0: none
    unsigned char cookie[8]  # the client cookie

cdef struct _Entry:  # one slot of the packet cache (cache.Cache's parallel arrays, as one struct)
    unsigned char *block  # the key, then the stored reply, in one malloc'd block; NULL: a free slot
    double expires
    unsigned long long order  # which insert made it: purges go in this order, as cache.Cache's dict does
    unsigned int tag  # the key's hash, its low 32 bits: its home in the index
    unsigned int reply_size
    int qend  # where the stored reply's question ends, -1: wire.parse_question refuses it
    int opt_start, opt_end  # its OPT record as wire.find_opt finds it; -1: none, -2: find_opt raises
    unsigned short key_size
    unsigned char referenced  # CLOCK's bit: set by a hit

cdef struct _Bucket:  # the index over the slots: open addressing, linear probing, backward-shift deletion
    unsigned int tag  # the key's hash, its low 32 bits (a first check before the key's bytes)
    int slot  # -1: empty

# -- rate limits (ratelimit.py's accounts in C) --------------------------------

cdef struct _RateSlot:  # ratelimit._SLOT: an account's key hash (0: empty) and its tat (ns)
    unsigned long long key
    long long tat

cdef extern from *:
    """
    /* Accounts other workers change at the same time: loads and swaps that are whole. */
    static inline unsigned long long dnsrouter_load_u64(const void *p) {
        return __atomic_load_n((const unsigned long long *)p, __ATOMIC_RELAXED);
    }
    static inline long long dnsrouter_load_i64(const void *p) {
        return __atomic_load_n((const long long *)p, __ATOMIC_RELAXED);
    }
    static inline int dnsrouter_cas_u64(void *p, unsigned long long old, unsigned long long new_) {
        return __atomic_compare_exchange_n((unsigned long long *)p, &old, new_, 0, __ATOMIC_ACQ_REL,
                                           __ATOMIC_RELAXED);
    }
    static inline int dnsrouter_cas_i64(void *p, long long old, long long new_) {
        return __atomic_compare_exchange_n((long long *)p, &old, new_, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
    }
    """
    unsigned long long _load_u64 "dnsrouter_load_u64" (const void *p) nogil
    long long _load_i64 "dnsrouter_load_i64" (const void *p) nogil
    bint _cas_u64 "dnsrouter_cas_u64" (void *p, unsigned long long old, unsigned long long new) nogil
    bint _cas_i64 "dnsrouter_cas_i64" (void *p, long long old, long long new) nogil

cdef enum:  # what the limits count: indexes into Counters.limits and _LIMIT_KEYS
    CLIENT_QPS = 0  # a query over [limits] client_qps, dropped
    RRL_DROPPED, RRL_SLIPPED  # a limited response dropped, or sent truncated
    RRL_LIMITED  # + the account's kind (ratelimit.KINDS): RRL_LIMITED + 0, 1, 2
    LIMIT_COUNTS = RRL_LIMITED + 3
    RATE_WAYS = 4  # ratelimit.WAYS (checked at import)
    RATE_KEY = 280  # room for an RRL key: a network (9 bytes), the kind, a name, type and class
