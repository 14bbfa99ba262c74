# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The UDP packet path's common case, compiled: what ``udp.serve`` and
``Upstream.serve`` do for an ordinary query and its reply, without the
interpreter in the loop.

The pure-Python modules stay the reference: this one does the same thing
for the packets it takes and hands every other packet, unchanged, to the
Python code (``Forwarder.handle`` on the client side, ``Forwarder.reply`` on
the reply side). Timeouts, retries, ICMP errors, the SERVFAIL they end in,
and TCP never come here. With the packet cache on (``Forwarder.cache``, a
``PacketCache`` of this module), a query it takes is answered from the
cache when it can be, in the slot it came in, and a reply it relays is
inserted (``cache.py``'s rules, written here in C).

What it decides itself, for every datagram (``_decide``, the order of
``Forwarder._handle``): a drop (short, a response, a client ``[server]
allow`` refuses with ``deny_action = drop``), the router's own answer
(REFUSED for the ACL and for a NOTIFY from outside ``[cache]
notify_allow``, NOTIMP, FORMERR, and ``[forward] no_route``'s SERVFAIL or
REFUSED once the route lookup finds no pool), written over the query in
its receive slot by ``_own_answer`` and queued at one place,
``_Queries.answer``; or the query to forward. The networks of the ACL and
of notify_allow are matched in C (``Networks``). What it hands to Python: a
NOTIFY from notify_allow (the purge), every query to route while the query
log is on, and a query whose pool has members that learn the client's
address (``client_address`` other than none). A reply: from the member
asked, with our ID and the question asked, to a UDP client whose query was
not changed.

Each packet handed to the Python code is counted by why
(``HANDOFF_REASONS``, ``dnsrouter_fast_path_handoffs_total``).

The contract with the Python modules: this one reads and calls only their
public names (``Forwarder.handle``, ``upstreams``, ``upstreams_for``,
``rtos``, ``matcher``, ``allow``, ``deny_action``, ``notify_allow``, ``no_route``,
``query_log``, ``timeout``, ``cache``;
``Pool.rotation``, ``modes``, ``backends``; ``Upstream.pending``,
``waiting``, ``limit``, ``fd``, ``sock``, ``policy``, ``counts``, ``tick``,
``errors``, ``retry``, ``closing``; the policy's ``rtts``, ``rtos``,
``last_answered``, ``retry_min``, ``timeout``, ``answered``, ``reply``,
``cache``),
which tests/test_fastpath_seam.py holds it to, and it takes every constant
it shares with them (batch and slot sizes, stale errnos, RTT gains, the
escape table, counter keys) from them at import.

Safety: every length read from a packet is checked against the datagram's
length before the byte it counts is read; the datagrams live in slots of
64 KiB (the largest UDP payload fits), and the parse of a question never
writes more than ``KEY`` bytes.
"""
from cpython cimport array
import array
import collections
from libc.stdlib cimport malloc, calloc, free, realloc, qsort
from libc.string cimport memcpy, memcmp, memset, strerror
from libc.errno cimport errno, EINTR
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem, PyDict_DelItem

# The C declarations. Included, not found by name: Cython looks for a
# module's own .pxd by its dotted name (dnsrouter/workers/_fastpath.pxd),
# which no directory of the checkout spells (package_dir in setup.cfg).
include "_fastpath.pxd"

# The rules and sizes this module shares with the Python path, read from
# there. The Python API is typed in _fastpath.pyi.
from dnsrouter import cache as _cache, counters as _counters, ecs as _ecs, wire
from dnsrouter.control import LATENCY_BUCKETS
from dnsrouter.workers import mmsg, rtt
from dnsrouter.workers.upstream import TICK

cdef int _batch = mmsg.BATCH  # datagrams per call, either way
cdef size_t _slot = mmsg.MAX_DATAGRAM  # room per received datagram
if not 1 <= _batch <= OUT:
    raise ImportError(f"mmsg.BATCH must be within 1..{OUT}")
cdef double _tick = TICK  # the upstreams' clocks
cdef double _ALPHA = rtt.ALPHA, _BETA = rtt.BETA, _K = rtt.K  # RFC 6298's gains, as Rtt.sample uses them
_deque = collections.deque  # of the retry queues
_raw_address = mmsg.raw_address
_peer_key = mmsg.peer_key
_name_to_text = wire.name_to_text

BUILT = True  # what the loader checks
cdef object _UNSET = object()  # no value yet, where None is a value


# mmsg.STALE_ERRORS as a table: an ICMP error taken by this send, meant for an earlier one.
cdef bint _STALE[ERRNOS]
memset(_STALE, 0, sizeof(_STALE))
for _e in mmsg.STALE_ERRORS:
    if not 0 < _e < ERRNOS:
        raise ImportError(f"errno {_e} is past the table of stale errnos")
    _STALE[_e] = True


cdef inline bint _stale(int e) noexcept nogil:
    return 0 < e < ERRNOS and _STALE[e]


cdef inline double _monotonic() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)  # what time.monotonic reads on Linux
    return t.tv_sec + t.tv_nsec * 1e-9


cdef inline long long _monotonic_ns() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)  # what time.monotonic_ns reads on Linux
    return t.tv_sec * 1_000_000_000LL + t.tv_nsec


# wire.make_answer's OPT record (the router's EDNS buffer size, wire.ANSWER_PAYLOAD).
cdef unsigned char _OPT_ANSWER[11]
memset(_OPT_ANSWER, 0, sizeof(_OPT_ANSWER))
_OPT_ANSWER[2] = 41
_OPT_ANSWER[3] = wire.ANSWER_PAYLOAD >> 8
_OPT_ANSWER[4] = wire.ANSWER_PAYLOAD & 0xFF
cdef int _FORMERR = wire.FORMERR, _SERVFAIL = wire.SERVFAIL, _NOTIMP = wire.NOTIMP, _REFUSED = wire.REFUSED
cdef int _OPCODE_NOTIFY = wire.OPCODE_NOTIFY


cdef class Networks:
    """A set of IPv4 and IPv6 networks (``ipaddress`` objects, as a Config
    holds them: ``[server] allow``, ``[cache] notify_allow``) matched in C
    against a raw peer address (the ``struct sockaddr`` bytes recvmmsg
    writes), with ``contains`` (nogil) or, from Python, ``in``. The same
    verdict as ``acl.make``'s test of ``mmsg.host(sockaddr)``: an AF_INET6
    address of 24 bytes or more is IPv6 (an IPv4-mapped one matches IPv6
    networks only, as ``ipaddress`` has it), anything else IPv4."""

    cdef _Networks c

    def __cinit__(self, networks=()):
        networks = tuple(networks)
        self.c.count = 0
        self.c.nets = <_Net *>calloc(max(len(networks), 1), sizeof(_Net))
        if self.c.nets == NULL:
            raise MemoryError()
        cdef _Net *net
        cdef bytes packed
        cdef int i
        for network in networks:
            packed = network.network_address.packed  # masked to the prefix already (ip_network)
            net = self.c.nets + self.c.count
            net.family = network.version
            net.prefix = network.prefixlen
            if len(packed) != (4 if net.family == 4 else 16) or not 0 <= net.prefix <= 8 * len(packed):
                raise ValueError(f"not a network: {network!r}")
            memcpy(net.address, <const unsigned char *>PyBytes_AS_STRING(packed), len(packed))
            for i in range(net.prefix, 8 * len(packed)):  # host bits clear, whatever came
                net.address[i >> 3] &= ~(0x80 >> (i & 7))
            self.c.count += 1

    def __dealloc__(self):
        free(self.c.nets)

    def __len__(self):
        return self.c.count

    cdef bint contains(self, const unsigned char *sockaddr, Py_ssize_t n) noexcept nogil:
        """Whether the peer at ``sockaddr`` (``n`` bytes) is in one of the networks."""
        return _in_networks(&self.c, sockaddr, n)

    def __contains__(self, bytes sockaddr):
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(sockaddr)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(sockaddr)
        cdef bint found
        with nogil:  # as a loop calls it: a typed Networks, the GIL let go
            found = self.contains(p, n)
        return found


cdef bint _in_networks(const _Networks *networks, const unsigned char *sockaddr, Py_ssize_t n) noexcept nogil:
    """Networks.contains, for the C code that holds the struct (_decide)."""
    cdef unsigned short family
    cdef const unsigned char *address
    cdef int version, whole, bits
    cdef Py_ssize_t i
    cdef const _Net *net
    if n < 8:
        return False  # no address at all (mmsg.host would raise: never a client's)
    memcpy(&family, sockaddr, sizeof(family))
    if n >= 24 and family == AF_INET6:
        version, address = 6, sockaddr + 8
    else:
        version, address = 4, sockaddr + 4
    for i in range(networks.count):
        net = networks.nets + i
        if net.family != version:
            continue
        whole = net.prefix >> 3
        if memcmp(net.address, address, whole) != 0:
            continue
        bits = net.prefix & 7
        if bits and (address[whole] ^ net.address[whole]) & (0xFF00 >> bits) & 0xFF:
            continue
        return True
    return False


cdef void _decide(const unsigned char *p, Py_ssize_t n, const unsigned char *peer, Py_ssize_t peer_size,
                  const _Policy *policy, unsigned char *key, _Verdict *v) noexcept nogil:
    """``Forwarder._handle`` up to the route lookup, for a datagram of ``n``
    bytes from ``peer``: into ``v``, what it gets (a drop, the router's own
    answer, Python's decision, or FORWARD: its question lower-cased into
    ``key``, as ``wire.check_query`` keys it: the name as bytes.lower() has
    it, type and class as they are). The Python path is the reference
    (test_fastpath holds this to ``Forwarder.handle``)."""
    cdef Py_ssize_t end, i
    cdef int opcode, qtype
    cdef unsigned char c
    v.reason = v.rcode = v.end = 0
    v.echo = False
    if n < 12:
        v.action, v.reason = DROP, DROPPED_SHORT
        return
    if p[2] & 0x80:
        v.action, v.reason = DROP, DROPPED_RESPONSE
        return
    if policy.allow != NULL and not _in_networks(policy.allow, peer, peer_size):
        if policy.drop_denied:
            v.action, v.reason = DROP, DROPPED_ACL
        else:
            v.action, v.rcode = ANSWER, _REFUSED  # no question, no OPT: Forwarder._handle's end 0
        return
    end = _question_end(p, n)  # labels of at most 63 bytes, no pointer, at most 255 bytes of name
    if end > 0:
        v.end = <int>end
    opcode = (p[2] >> 3) & 0xF
    v.action = ANSWER
    if opcode:
        if opcode != _OPCODE_NOTIFY:
            v.rcode, v.echo = _NOTIMP, end > 0
        elif end < 0 or p[4] or p[5] != 1:  # Forwarder._notify: the question echoed if it parses
            v.rcode, v.echo = _FORMERR, end > 0
        elif not _in_networks(policy.notify, peer, peer_size):
            v.rcode, v.echo = _REFUSED, True
        else:
            v.action, v.reason = TO_PYTHON, NOTIFY_ALLOWED  # the purge
        return
    if p[4] or p[5] != 1 or end < 0:  # QDCOUNT, a question: none echoed (wire.check_query)
        v.rcode = _FORMERR
        return
    qtype = p[end - 4] << 8 | p[end - 3]
    if qtype == 251 or qtype == 252:  # IXFR, AXFR
        v.rcode, v.echo = _NOTIMP, True
        return
    for i in range(end - 16):  # the name as bytes.lower() has it: ASCII letters only
        c = p[12 + i]
        key[i] = c + 32 if 65 <= c <= 90 else c
    memcpy(key + end - 16, p + end - 4, 4)  # type and class as they are: 65 is no 97
    v.action = FORWARD


cdef Py_ssize_t _own_answer(unsigned char *p, Py_ssize_t n, int rcode, Py_ssize_t end, bint echo) noexcept nogil:
    """Every answer the compiled path makes itself, written over the query
    (``n`` bytes at ``p``, its receive slot): ``wire.make_answer(query,
    rcode, question if echo else None, edns)``, ``edns`` as
    ``Forwarder._answer`` reckons it (``end``: where the question ends, 0 if
    it does not parse; the OPT found past it by ``wire.has_opt``). Its size,
    at most ``n``: what it adds to the query's header (the question, the
    OPT) is in the query already, or (an OPT) no longer than the record it
    found there."""
    cdef Py_ssize_t start, stop, size = end if echo and end > 0 else 12
    cdef bint edns = end > 0 and _find_opt(p, n, end, &start, &stop) == 1
    p[2] = 0x80 | (p[2] & 0x79)  # QR, the opcode, RD; AA and TC clear
    p[3] = rcode & 0xF
    memset(p + 4, 0, 8)
    p[5] = size > 12  # QDCOUNT
    p[11] = edns  # ARCOUNT
    if edns:
        memcpy(p + size, _OPT_ANSWER, 11)
        size += 11
    return size


cdef inline void _count_verdict(Counters counters, const _Verdict *v) noexcept:
    """What Forwarder._handle counts of a datagram _decide did not forward
    (an answer's response is counted where it is queued)."""
    if v.action == DROP:
        counters.fixed[v.reason] += 1
        if v.reason == DROPPED_ACL:
            counters.fixed[QUERIES] += 1
    elif v.action == ANSWER:
        counters.fixed[QUERIES] += 1
    elif v.action == TO_PYTHON:
        counters.handoffs[v.reason] += 1


cdef inline bint _same_question(const unsigned char *p, const unsigned char *q, Py_ssize_t n) noexcept nogil:
    """Whether the question at ``p`` is ``q`` (a key of ``n`` bytes from _decide)."""
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n - 4):
        c = p[i]
        if (c + 32 if 65 <= c <= 90 else c) != q[i]:
            return False
    return memcmp(p + n - 4, q + n - 4, 4) == 0


# What wire.name_to_text writes as it is (wire.PLAIN); any other byte is escaped there.
cdef bint _PLAIN[256]
memset(_PLAIN, 0, sizeof(_PLAIN))
for _c in wire.PLAIN:
    _PLAIN[_c] = True


cdef object _route(RouteCache cache, const unsigned char *key, Py_ssize_t n):
    """``matcher.lookup`` for the lower-cased wire name ``key`` (``n`` bytes,
    the root label's included): the text made here and one pass of the
    matcher's RE2 set, the first registered pool with a usable backend. A
    flood of names never seen (random subdomains) costs this, not a round
    through the interpreter. Names that need escaping, and the root, take the
    Python matcher."""
    cdef unsigned char text[256]  # a wire name of at most 255 bytes has as many characters, less one
    cdef Py_ssize_t pos = 0, out = 0, label, i, best = -1, index
    if key[0] == 0:
        return cache.matcher.lookup(_name_to_text(PyBytes_FromStringAndSize(<char *>key, n)))
    while key[pos]:
        label = key[pos]
        for i in range(pos + 1, pos + 1 + label):
            if not _PLAIN[key[i]]:
                return cache.matcher.lookup(_name_to_text(PyBytes_FromStringAndSize(<char *>key, n)))
            text[out] = key[i]
            out += 1
        text[out] = 46  # '.'
        out += 1
        pos += label + 1
    if cache.match is None:
        return None
    pools = cache.pools  # Matcher.lookup: the lowest index whose pool has a backend
    for found in cache.match(PyBytes_FromStringAndSize(<char *>text, out)) or ():
        index = found
        if (best < 0 or index < best) and pools[index].backends:
            best = index
    return pools[best] if best >= 0 else None


cdef class RouteCache:
    """The pool of each recent question, for one compiled thread: a table in
    C of SETS sets of WAYS entries, keyed by the lower-cased question (name,
    type, class), holding the question's bytes (which every Pending entry of
    it shares) and the pool the matcher picked. A hit makes no object and
    touches no dict; a miss (a flood of random names) replaces an entry in
    its set, one bytes object made and one freed, where a dict would grow
    and be cleared whole. Entries hold for one matcher: a new route table
    or new health empties the cache. About 0.4 MB, plus the questions held
    (up to 16,384)."""

    cdef _Way *ways
    cdef object matcher  # the table the entries were found in
    cdef object match, pools  # its match_bytes (None: no route) and pools, for _route
    cdef unsigned int victim  # which way a full set gives up next, in turn

    def __cinit__(self):
        self.ways = <_Way *>calloc(SETS * WAYS, sizeof(_Way))
        if self.ways == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.ways != NULL:
            self.clear()
            free(self.ways)

    cdef void clear(self) noexcept:
        cdef int i
        for i in range(SETS * WAYS):
            Py_XDECREF(self.ways[i].question)
            Py_XDECREF(self.ways[i].pool)
            self.ways[i].question = self.ways[i].pool = NULL

    cdef inline int use(self, matcher) except -1:
        """Entries from this matcher only (read once a batch)."""
        if matcher is not self.matcher:
            self.clear()
            self.matcher = matcher
            self.match = matcher.match_bytes if matcher.routes else None
            self.pools = matcher.pools
        return 0

    cdef _Way *find(self, const unsigned char *key, Py_ssize_t n, Py_hash_t hash) except NULL:
        """The entry of question ``key`` (``n`` bytes from _decide, its hash
        ``hash``), found or made."""
        cdef _Way *ways = self.ways + (<size_t>hash & (SETS - 1)) * WAYS
        cdef _Way *way
        cdef int i
        for i in range(WAYS):
            way = ways + i
            if (way.hash == hash and way.question != NULL and PyBytes_GET_SIZE(<object>way.question) == n
                    and memcmp(PyBytes_AS_STRING(<object>way.question), key, n) == 0):
                return way
        question = PyBytes_FromStringAndSize(<char *>key, n)
        pool = _route(self, key, n - 4)
        for i in range(WAYS):
            if ways[i].question == NULL:
                way = ways + i
                break
        else:
            way = ways + self.victim % WAYS
            self.victim += 1
        Py_XDECREF(way.question)
        Py_XDECREF(way.pool)
        way.hash = hash
        way.question, way.pool = <PyObject *>question, <PyObject *>pool
        Py_INCREF(way.question)
        Py_INCREF(way.pool)
        return way

    def lookup(self, matcher, bytes question):
        """(question, pool) for a lower-cased question, as ``serve`` looks it
        up, for the tests: the question object is the cached one on a hit."""
        cdef Py_ssize_t pos = 0, n = PyBytes_GET_SIZE(question)
        while pos < n - 4 and question[pos]:  # _route reads a well-formed name only, as _decide leaves it
            pos += question[pos] + 1
        if pos != n - 5 or n - 4 > 255:
            raise ValueError("not a question")
        cdef const unsigned char *key = <const unsigned char *>PyBytes_AS_STRING(question)
        self.use(matcher)
        cdef _Way *way = self.find(key, n, _Py_HashBytes(key, n))
        return <object>way.question, <object>way.pool


cdef _Networks _NOBODY  # no networks: a NOTIFY policy of nobody
_NOBODY.count = 0
_NOBODY.nets = NULL


def classify(bytes packet):
    """The compiled check of one query, for the tests: (end, lower-cased
    question) of one the compiled path routes (with no ACL), or None."""
    cdef unsigned char key[KEY]
    cdef _Verdict v
    cdef _Policy policy
    policy.allow = NULL
    policy.drop_denied = False
    policy.notify = &_NOBODY
    _decide(<const unsigned char *>PyBytes_AS_STRING(packet), PyBytes_GET_SIZE(packet), NULL, 0, &policy, key, &v)
    if v.action != FORWARD:
        return None
    return v.end, PyBytes_FromStringAndSize(<char *>key, v.end - 12)


def decide(bytes packet, bytes peer, Networks allow=None, bint drop_denied=False, Networks notify=None,
           int no_route=2, bint routed=True, Counters counters=None):
    """What ``_Queries.take`` does with one datagram from raw address
    ``peer``, with the same C (for the tests): ("forward", (end, lower-cased
    question)); ("answer", its bytes); ("drop", the reason dropped{} counts);
    ("python", the handoff reason). ``allow``: ``[server] allow`` (None:
    everyone), ``drop_denied``: ``deny_action = drop``, ``notify``: ``[cache]
    notify_allow`` (None: nobody); ``routed``: whether the route lookup finds
    a pool, else the ``no_route`` answer. Counted in ``counters`` as take counts."""
    cdef unsigned char key[KEY]
    cdef _Verdict v
    cdef _Policy policy
    cdef Py_ssize_t n = PyBytes_GET_SIZE(packet), size
    policy.allow = &allow.c if allow is not None else NULL
    policy.drop_denied = drop_denied
    policy.notify = &notify.c if notify is not None else &_NOBODY
    cdef unsigned char *slot = <unsigned char *>malloc(n + 1)  # the answer is written over the query, as in its slot
    if slot == NULL:
        raise MemoryError()
    try:
        memcpy(slot, PyBytes_AS_STRING(packet), n)
        _decide(slot, n, <const unsigned char *>PyBytes_AS_STRING(peer), PyBytes_GET_SIZE(peer), &policy, key, &v)
        if v.action == FORWARD and not routed:
            v.action, v.rcode, v.echo = ANSWER, no_route, True
        if counters is not None:
            if v.action == FORWARD:
                counters.fixed[QUERIES] += 1
            else:
                _count_verdict(counters, &v)
        if v.action == FORWARD:
            return "forward", (v.end, PyBytes_FromStringAndSize(<char *>key, v.end - 12))
        if v.action == DROP:
            return "drop", _FIXED_KEYS[v.reason][1]
        if v.action == TO_PYTHON:
            return "python", HANDOFF_REASONS[v.reason]
        size = _own_answer(slot, n, v.rcode, v.end, v.echo)
        if counters is not None:
            counters.responses[v.rcode & 0xF] += 1
        return "answer", PyBytes_FromStringAndSize(<char *>slot, size)
    finally:
        free(slot)


cdef class Receiver:
    """Blocking reads of up to ``mmsg.BATCH`` datagrams from one socket
    (``mmsg.Receiver``, with the GIL released while the thread waits)."""

    cdef object _sock
    cdef int fd
    cdef int name_size
    cdef int flags
    cdef unsigned int n
    cdef unsigned char *buffer
    cdef unsigned char *names
    cdef iovec *iov
    cdef mmsghdr *hdrs

    def __cinit__(self, sock, unsigned int n=0, bint wait=True):  # n=0: mmsg.BATCH
        self._sock = sock  # keeps the descriptor open while we use its number
        self.fd = sock.fileno()
        # wait=False: what is there now, EAGAIN if nothing (a socket epoll said is readable)
        self.flags = MSG_WAITFORONE if wait else MSG_DONTWAIT
        self.name_size = NAME if sock.family == AF_INET6 else 16
        self.n = min(n, <unsigned int>_batch) if n else <unsigned int>_batch
        # malloc of 2 MiB maps anonymous memory: a slot's pages are backed only once touched
        self.buffer = <unsigned char *>malloc(<size_t>self.n * _slot)
        self.names = <unsigned char *>malloc(<size_t>self.n * NAME)
        self.iov = <iovec *>calloc(self.n, sizeof(iovec))
        self.hdrs = <mmsghdr *>calloc(self.n, sizeof(mmsghdr))
        if self.buffer == NULL or self.names == NULL or self.iov == NULL or self.hdrs == NULL:
            raise MemoryError()
        cdef unsigned int i
        for i in range(self.n):
            self.iov[i].iov_base = self.buffer + <size_t>i * _slot
            self.iov[i].iov_len = _slot
            self.hdrs[i].msg_hdr.msg_name = self.names + i * NAME
            self.hdrs[i].msg_hdr.msg_iov = &self.iov[i]
            self.hdrs[i].msg_hdr.msg_iovlen = 1

    def __dealloc__(self):
        free(self.buffer)
        free(self.names)
        free(self.iov)
        free(self.hdrs)

    cdef int wait(self) except -1:
        """The number of datagrams read; OSError (EINTR included) on failure."""
        cdef int got, error = 0
        cdef unsigned int i
        with nogil:
            for i in range(self.n):
                self.hdrs[i].msg_hdr.msg_namelen = self.name_size
            got = recvmmsg(self.fd, self.hdrs, self.n, self.flags, NULL)
            if got < 0:
                error = errno
        if got < 0:
            raise OSError(error, strerror(error).decode())
        return got

    cdef inline const unsigned char *data(self, int i) noexcept nogil:
        return self.buffer + <size_t>i * _slot

    cdef inline Py_ssize_t length(self, int i) noexcept nogil:
        return self.hdrs[i].msg_len

    cdef inline bytes payload(self, int i):
        return PyBytes_FromStringAndSize(<char *>self.data(i), self.hdrs[i].msg_len)

    cdef inline bytes peer(self, int i):
        return PyBytes_FromStringAndSize(<char *>self.names + i * NAME, self.name_size)

    cdef inline const unsigned char *name(self, int i) noexcept nogil:
        return self.names + i * NAME

    cdef inline Py_ssize_t name_length(self, int i) noexcept nogil:
        """The peer address's length as the kernel wrote it (msg_namelen)."""
        return self.hdrs[i].msg_hdr.msg_namelen

    def receive(self):
        """As ``mmsg.Receiver.receive``: [(payload, raw peer address)]."""
        cdef int got = self.wait(), i
        return [(self.payload(i), self.peer(i)) for i in range(got)]


cdef class Outbox:
    """What one thread sends during one batch (``mmsg.Outbox``): the
    payloads are not copied, the iovecs point into the bytes objects, which
    the outbox holds until they are sent, or into a Receiver's slots
    (``add_from``: a forwarded query or reply goes out of the slot it came
    in, its ID rewritten in place)."""

    cdef public int pick  # which upstream socket this batch's queries leave from
    cdef int count
    cdef list _held
    cdef int fds[OUT]
    cdef unsigned char names[OUT][NAME]
    cdef iovec iov[OUT]
    cdef mmsghdr hdrs[OUT]
    cdef unsigned short ids[IDS]
    cdef int next_id

    def __cinit__(self):
        self._held = []
        self.count = 0
        self.next_id = IDS
        memset(self.hdrs, 0, sizeof(self.hdrs))
        self.pick = self.random_id()

    cdef int random_id(self) except -1:
        """An unpredictable 16-bit number from the kernel, drawn in batches."""
        if self.next_id >= IDS:
            if getrandom(self.ids, sizeof(self.ids), 0) != sizeof(self.ids):
                raise OSError(errno, "getrandom failed")
            self.next_id = 0
        self.next_id += 1
        return self.ids[self.next_id - 1]

    cpdef add(self, int fd, bytes payload, bytes name):
        self.add_from(fd, <unsigned char *>PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload),
                      <const unsigned char *>PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))
        self._held.append(payload)

    cdef int add_from(self, int fd, unsigned char *data, Py_ssize_t size, const unsigned char *name,
                      Py_ssize_t name_size) except -1:
        """As ``add``, of a datagram in a Receiver's slot, not copied: the
        slot must stay as it is until the flush, which every loop here does
        before its receiver reads again."""
        if name_size > NAME:
            raise ValueError("not a socket address")
        if self.count == OUT:
            self.flush()
        cdef int i = self.count
        self.fds[i] = fd
        memcpy(self.names[i], name, name_size)
        self.iov[i].iov_base = data
        self.iov[i].iov_len = size
        self.hdrs[i].msg_hdr.msg_name = self.names[i]
        self.hdrs[i].msg_hdr.msg_namelen = <socklen_t>name_size
        self.hdrs[i].msg_hdr.msg_iov = &self.iov[i]
        self.hdrs[i].msg_hdr.msg_iovlen = 1
        self.count = i + 1
        return 0

    cpdef flush(self):
        cdef int count = self.count
        if count == 0:
            return
        with nogil:
            _send_grouped(self.fds, self.hdrs, count)
        self.count = 0
        del self._held[:]
        self.pick = self.random_id()


cdef void _send_grouped(int *fds, mmsghdr *hdrs, int count) noexcept nogil:
    """Each socket's datagrams in sendmmsg calls of up to mmsg.BATCH, in
    order; a datagram the kernel refuses is lost, as a datagram may be."""
    cdef mmsghdr run[OUT]  # mmsg.BATCH is at most OUT (checked at import)
    cdef bint sent[OUT]
    cdef int start, i, n, fd
    memset(sent, 0, sizeof(sent))
    for start in range(count):
        if sent[start]:
            continue
        fd = fds[start]
        n = 0
        for i in range(start, count):
            if not sent[i] and fds[i] == fd:
                run[n] = hdrs[i]
                sent[i] = True
                n += 1
                if n == _batch:
                    _send_run(fd, run, n)
                    n = 0
        if n:
            _send_run(fd, run, n)


cdef void _send_run(int fd, mmsghdr *run, int n) noexcept nogil:
    cdef int done = 0, again = -1, got
    cdef msghdr *h
    if n == 1:  # light traffic: one datagram, one sendto
        h = &run[0].msg_hdr
        if sendto(fd, h.msg_iov.iov_base, h.msg_iov.iov_len, 0, h.msg_name, h.msg_namelen) < 0 and _stale(errno):
            sendto(fd, h.msg_iov.iov_base, h.msg_iov.iov_len, 0, h.msg_name, h.msg_namelen)
        return
    while done < n:
        got = sendmmsg(fd, run + done, n - done, 0)
        if got > 0:
            done += got
        elif again != done and _stale(errno):
            again = done  # an earlier datagram's error: this one once more
        else:
            done += 1


cdef inline void _count(object counts, object key, long n=1):
    """``counts[key] += n`` for a defaultdict(int) (Counts)."""
    cdef PyObject *old = PyDict_GetItem(counts, key)
    counts[key] = (<object>old if old != NULL else 0) + n


_key = _counters.key  # a kind not declared in dnsrouter.counters fails the import
_FIXED_KEYS = (_key("ignored_replies", "short"), _key("ignored_replies", "unknown_id"),
               _key("ignored_replies", "wrong_source"), _key("ignored_replies", "wrong_question"),
               _key("dropped", "in_flight_limit"), _key("dropped", "error"), _key("queries", "udp"),
               _key("dropped", "short"), _key("dropped", "response"), _key("dropped", "acl"))
# Why the compiled loop hands a query to Python (Forwarder.handle), in the order of the enum in the .pxd.
HANDOFF_REASONS = ("query_log", "notify", "client_address")
_HANDOFF_KEYS = tuple(_key("fast_path_handoffs", reason) for reason in HANDOFF_REASONS)
if len(_FIXED_KEYS) != FIXED or len(HANDOFF_REASONS) != REASONS:  # snapshot reads the keys unchecked
    raise ImportError("the counter keys and their indexes in _fastpath.pxd differ")


cdef class Counters:
    """What one thread of the compiled path counts per packet, in C: no
    tuple, no hash, no dict per count. The stats reporter reads them
    (``Stats.add``) as totals keyed as the Python path's counts, so
    ``/metrics`` shows the same numbers either way; it reads them under
    the GIL, which the counting thread holds whenever it counts."""

    cdef long long fixed[FIXED]
    cdef long long handoffs[REASONS]
    cdef long long responses[RCODES]
    cdef long long buckets[BUCKETS]
    cdef int nbuckets
    cdef double latency_sum
    cdef long long backend_queries[BACKENDS]
    cdef long long late_replies[BACKENDS]
    cdef long long limits[LIMIT_COUNTS]
    cdef dict slots  # backend -> its index in the two arrays above
    cdef list backends

    def __cinit__(self, int latency_buckets=0):  # 0: a thread that times no reply
        if not 0 <= latency_buckets < BUCKETS:
            raise ValueError("too many latency buckets")
        self.nbuckets = latency_buckets + 1
        self.slots = {}
        self.backends = []

    cdef inline int slot(self, backend):
        """The backend's index; -1 once BACKENDS are taken."""
        cdef PyObject *found = PyDict_GetItem(self.slots, backend)
        if found != NULL:
            return <int>(<object>found)
        cdef int i = len(self.backends)
        if i == BACKENDS:
            return -1
        self.backends.append(backend)
        self.slots[backend] = i
        return i

    def snapshot(self):
        """{(kind, label): total since the start}, counts of 0 left out."""
        cdef int i
        out = {}
        for i in range(FIXED):
            if self.fixed[i]:
                out[_FIXED_KEYS[i]] = self.fixed[i]
        for i in range(REASONS):
            if self.handoffs[i]:
                out[_HANDOFF_KEYS[i]] = self.handoffs[i]
        for i in range(LIMIT_COUNTS):
            if self.limits[i]:
                out[_LIMIT_KEYS[i]] = self.limits[i]
        for i in range(RCODES):
            if self.responses[i]:
                out["responses", i] = self.responses[i]
        for i in range(self.nbuckets):
            if self.buckets[i]:
                out["latency_bucket", i] = self.buckets[i]
        if self.latency_sum:
            out["latency_sum", ""] = self.latency_sum
        for i, backend in enumerate(self.backends):
            if self.backend_queries[i]:
                out["backend_queries", backend] = self.backend_queries[i]
            if self.late_replies[i]:
                out["late_replies", backend] = self.late_replies[i]
        return out


# -- the packet cache (issue 27) ------------------------------------------------
#
# dnsrouter/cache.py's rules, in C, each function naming the one it mirrors
# byte for byte (tests/test_cache_compiled.py holds them to it), and
# PacketCache, cache.PacketCache with its entries in C: a hit in the
# compiled loop is answered in the slot the query came in, without an
# object made. Every length read from a packet is checked against the
# packet's length before the bytes it counts are read.

cdef int _OPTION_COOKIE = _cache.OPTION_COOKIE
cdef int _CLIENT_COOKIE = _cache.CLIENT_COOKIE
cdef Py_ssize_t _MAX_KEY = _cache.MAX_KEY
cdef Py_ssize_t _NO_EDNS = _ecs.NO_EDNS_PAYLOAD
cdef unsigned int _TYPE_OPT = wire.TYPE_OPT, _TYPE_SOA = wire.TYPE_SOA
cdef unsigned int _TYPE_AXFR = wire.TYPE_AXFR, _TYPE_IXFR = wire.TYPE_IXFR
cdef unsigned int _TYPE_SIG = _ecs.TYPE_SIG, _TYPE_TSIG = _ecs.TYPE_TSIG
if _MAX_KEY > CACHE_KEY or _CLIENT_COOKIE != 8:
    raise ImportError("cache.MAX_KEY or CLIENT_COOKIE differ from the room _fastpath.pxd gives them")
if _slot < CACHE_ANSWER:  # a hit is written into the slot its query came in
    raise ImportError("mmsg.MAX_DATAGRAM leaves no room for a cached answer in a slot")

# What an entry costs beyond its key and reply bytes: its slot and its place
# in the free list (grown by a quarter at a time: an eighth more on average),
# the index's buckets (kept at most half full, and at least a quarter after
# it doubles: 3 per entry on average), and malloc's own bytes for the block.
# test_cache_compiled measures it with mallinfo2.
CACHE_ENTRY_OVERHEAD = (sizeof(_Entry) + sizeof(int)) * 9 // 8 + 3 * sizeof(_Bucket) + CACHE_CHUNK
cdef Py_ssize_t _OVERHEAD = CACHE_ENTRY_OVERHEAD


cdef inline unsigned int _u16(const unsigned char *p) noexcept nogil:
    return p[0] << 8 | p[1]


cdef inline unsigned long long _u32(const unsigned char *p) noexcept nogil:
    return <unsigned long long>p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3]


cdef inline unsigned char _lower(unsigned char c) noexcept nogil:
    return c + 32 if 65 <= c <= 90 else c  # bytes.lower(): ASCII letters only


cdef bint _query_edns(const unsigned char *q, Py_ssize_t n, Py_ssize_t end, _QueryEdns *e) noexcept nogil:
    """cache._query_edns: whether the query is cacheable, its EDNS in ``e``."""
    cdef Py_ssize_t pos, data_end, length
    e.edns = False
    e.payload = _NO_EDNS
    e.cookie_size = 0
    if n < 12 or q[2] & 0xF8 or q[4] or q[5] != 1 or q[6] or q[7] or q[8] or q[9] or q[10]:
        return False
    if q[11] == 0:
        return end == n
    if end < 0 or q[11] != 1 or end + 11 > n or q[end] != 0:
        return False  # (a negative end is no question's end: answer and key refuse it either way)
    if _u16(q + end + 1) != _TYPE_OPT or end + 11 + <Py_ssize_t>_u16(q + end + 9) != n:
        return False
    e.payload = max(<Py_ssize_t>_u16(q + end + 3), _NO_EDNS)
    pos = end + 11
    while pos < n:
        if pos + 4 > n:
            return False
        length = _u16(q + pos + 2)
        data_end = pos + 4 + length
        if data_end > n:
            return False
        if _u16(q + pos) == <unsigned int>_OPTION_COOKIE:
            if e.cookie_size or not (length == _CLIENT_COOKIE or 16 <= length <= 40):
                return False
            e.cookie_size = 4 + length
            memcpy(e.cookie, q + pos + 4, 8)
        pos = data_end
    e.edns = True
    return True


cdef Py_ssize_t _cache_key(const unsigned char *q, Py_ssize_t n, Py_ssize_t end,
                           unsigned char *key) noexcept nogil:
    """cache.key, written into ``key`` (CACHE_KEY bytes of room): its length, or -1 for None."""
    cdef _QueryEdns e
    cdef Py_ssize_t size, i, pos, stop
    cdef unsigned int qtype
    if end < 17 or end > n or not _query_edns(q, n, end, &e):
        return -1
    qtype = _u16(q + end - 4)
    if qtype == _TYPE_AXFR or qtype == _TYPE_IXFR:
        return -1
    size = end - 12 + 1
    if e.edns:
        size += 1 + 4 + (n - end - 11) - e.cookie_size
    if size > _MAX_KEY:
        return -1
    for i in range(12, end - 4):
        key[i - 12] = _lower(q[i])
    memcpy(key + end - 16, q + end - 4, 4)
    key[end - 12] = (q[2] & 0x01) << 7 | q[3] & 0x30  # RD; AD and CD
    if not e.edns:
        return size
    pos = end - 11
    key[pos] = 1  # the marker: no EDNS key is an EDNS one
    memcpy(key + pos + 1, q + end + 5, 4)  # extended rcode, version, flags
    pos += 5
    i = end + 11
    while i < n:  # the options as sent, but COOKIE (_query_edns checked their lengths)
        stop = i + 4 + _u16(q + i + 2)
        if _u16(q + i) != <unsigned int>_OPTION_COOKIE:
            memcpy(key + pos, q + i, stop - i)
            pos += stop - i
        i = stop
    return size


cdef Py_ssize_t _skip_name(const unsigned char *p, Py_ssize_t n, Py_ssize_t pos) noexcept nogil:
    """wire.skip_name: the offset after the name at ``pos``, -1 where it raises."""
    cdef unsigned char length
    while pos < n:
        length = p[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            return pos + 2
        if length > 63:
            return -1
        pos += length + 1
    return -1


cdef Py_ssize_t _question_end(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    """wire.parse_question(p)[3], -1 where it raises."""
    cdef Py_ssize_t pos = 12
    cdef unsigned char length
    while True:
        if pos >= n:
            return -1
        length = p[pos]
        if length == 0:
            pos += 1
            break
        if length > 63:
            return -1
        pos += length + 1
    if pos - 12 > 255 or pos + 4 > n:
        return -1
    return pos + 4


cdef int _find_opt(const unsigned char *p, Py_ssize_t n, Py_ssize_t offset,
                   Py_ssize_t *start, Py_ssize_t *stop) noexcept nogil:
    """wire.find_opt (``offset`` < 0: None): 1, the OPT's start and end set;
    0, no OPT; -1 where it raises."""
    cdef Py_ssize_t pos = 12, at, records, index, additional
    cdef unsigned int qd, rtype
    if n < 12:
        return -1
    qd = _u16(p + 4)
    additional = _u16(p + 6) + _u16(p + 8)
    records = additional + _u16(p + 10)
    if records == additional:
        return 0
    if offset < 0:
        for index in range(qd):
            pos = _skip_name(p, n, pos)
            if pos < 0:
                return -1
            pos += 4
    else:
        pos = offset
    for index in range(records):
        at = pos
        pos = _skip_name(p, n, pos)
        if pos < 0 or pos + 10 > n:
            return -1
        rtype = _u16(p + pos)
        pos += 10 + _u16(p + pos + 8)
        if pos > n:
            return -1
        if index >= additional and rtype == _TYPE_OPT:
            start[0] = at
            stop[0] = pos
            return 1
    return 0


cdef double _lifetime(const unsigned char *r, Py_ssize_t size, double max_ttl,
                      double max_negative_ttl) noexcept nogil:
    """cache.lifetime: seconds, 0 for None."""
    cdef unsigned int rcode, an, rtype
    cdef Py_ssize_t pos, owner, start, names, index, records, authority, additional
    cdef unsigned long long ttl, least = 0x7FFFFFFF, soa = 0x7FFFFFFF, minimum
    cdef bint has_soa = False, has_opt = False
    cdef double value
    if size < 12 or r[2] & 0xFA != 0x80:  # QR set; opcode QUERY; TC clear
        return 0
    rcode = r[3] & 0xF
    if (rcode != 0 and rcode != 3) or _u16(r + 4) != 1:  # NOERROR, NXDOMAIN; one question
        return 0
    an = _u16(r + 6)
    authority, additional = an, an + _u16(r + 8)
    records = additional + _u16(r + 10)
    pos = _question_end(r, size)
    if pos < 0:
        return 0
    for index in range(records):
        owner = pos
        pos = _skip_name(r, size, pos)
        if pos < 0 or pos + 10 > size:
            return 0
        rtype = _u16(r + pos)
        ttl = _u32(r + pos + 4)
        start = pos + 10
        pos = start + _u16(r + pos + 8)
        if pos > size:
            return 0
        if rtype == _TYPE_OPT:
            if index < additional or has_opt or r[owner] != 0 or ttl >> 24:
                return 0  # misplaced, second, not the root's, or an extended rcode
            has_opt = True
            continue
        if rtype == _TYPE_TSIG or (rtype == _TYPE_SIG and index >= additional):
            return 0
        if ttl > 0x7FFFFFFF:
            ttl = 0
        if ttl < least:
            least = ttl
        if rtype == _TYPE_SOA and authority <= index < additional:
            names = _skip_name(r, size, start)  # MNAME, RNAME, then five numbers
            if names >= 0:
                names = _skip_name(r, size, names)
            if names < 0 or names + 20 != pos:
                return 0
            minimum = _u32(r + pos - 4)
            soa = min(soa, min(ttl, minimum))
            has_soa = True
    if pos != size:
        return 0
    value = <double>least  # Python's min: the first of equals, a later one only if less
    if rcode == 3 or an == 0:
        if not has_soa:
            return 0
        if <double>soa < value:
            value = <double>soa
        if max_negative_ttl < value:
            value = max_negative_ttl
    elif max_ttl < value:
        value = max_ttl
    return value if value > 0 else 0


cdef Py_ssize_t _without_cookies(const unsigned char *p, Py_ssize_t pos, Py_ssize_t end,
                                 unsigned char *out, bint *had_cookie) noexcept nogil:
    """cache._without_cookies: the length of the options between ``pos`` and
    ``end`` but COOKIE (written to ``out`` unless NULL), and whether there
    was a COOKIE; -1 for None."""
    cdef Py_ssize_t kept = 0, stop
    had_cookie[0] = False
    while pos < end:
        if pos + 4 > end:
            return -1
        stop = pos + 4 + _u16(p + pos + 2)
        if stop > end:
            return -1
        if _u16(p + pos) != <unsigned int>_OPTION_COOKIE:
            if out != NULL:
                memcpy(out + kept, p + pos, stop - pos)
            kept += stop - pos
        else:
            had_cookie[0] = True
        pos = stop
    return kept


cdef Py_ssize_t _storable(const unsigned char *r, Py_ssize_t n, unsigned char *out) noexcept nogil:
    """cache.storable: the stored form's length, -1 for None; written to
    ``out`` (as many bytes as the reply's: a COOKIE_MARK is shorter than
    the COOKIE it replaces) unless NULL."""
    cdef Py_ssize_t start = 0, stop = 0, kept, options
    cdef bint had_cookie
    cdef int found = _find_opt(r, n, -1, &start, &stop)
    if found < 0:
        return -1
    kept = _without_cookies(r, start + 11, stop, NULL, &had_cookie) if found and stop - start != 11 else 0
    if kept < 0:
        return -1
    if found == 0 or stop - start == 11 or not had_cookie:
        if out != NULL:
            memcpy(out, r, n)
        return n
    options = kept + 4  # and COOKIE_MARK: a COOKIE of no bytes, last
    if out != NULL:
        memcpy(out, r, start + 9)
        out[start + 9] = options >> 8
        out[start + 10] = options & 0xFF
        _without_cookies(r, start + 11, stop, out + start + 11, &had_cookie)
        out[start + 11 + kept] = _OPTION_COOKIE >> 8
        out[start + 11 + kept + 1] = _OPTION_COOKIE & 0xFF
        out[start + 11 + kept + 2] = out[start + 11 + kept + 3] = 0
        memcpy(out + start + 11 + options, r + stop, n - stop)
    return start + 11 + options + n - stop


cdef void _parse_cached(const unsigned char *c, Py_ssize_t n, int *qend, int *opt_start,
                        int *opt_end) noexcept nogil:
    """What answer reads of a cached reply before the query: where its
    question ends (-1: parse_question raises), its OPT (-1: none; -2:
    find_opt raises). Made once, when the reply is stored."""
    cdef Py_ssize_t end = _question_end(c, n), start = -1, stop = -1
    qend[0] = <int>end
    opt_start[0] = opt_end[0] = -1
    if end < 0:
        return
    cdef int found = _find_opt(c, n, end, &start, &stop)
    if found < 0:
        opt_start[0] = -2
    elif found:
        opt_start[0], opt_end[0] = <int>start, <int>stop


cdef Py_ssize_t _answer(const unsigned char *c, Py_ssize_t cn, int qend, int opt_start, int opt_end,
                        const unsigned char *q, Py_ssize_t qn, Py_ssize_t end, bint tcp,
                        unsigned char *out) noexcept nogil:
    """cache.answer of the cached reply ``c`` (read by _parse_cached) to
    query ``q``, written to ``out`` (CACHE_ANSWER bytes of room; it may be
    ``q`` itself: what the query holds past ``end`` is read first): its
    length, -1 for None."""
    cdef _QueryEdns e
    cdef Py_ssize_t i, kept = 0, options = 0, total, pos
    cdef bint rewrite, had_cookie = False
    if not _query_edns(q, qn, end, &e) or qend < 0 or qend != end:
        return -1
    for i in range(12, end):
        if _lower(c[i]) != _lower(q[i]):
            return -1
    if opt_start == -2 or (opt_start >= 0 and c[opt_start] != 0):
        return -1  # records that do not parse; an OPT not owned by the root
    rewrite = opt_start >= 0 and opt_end - opt_start > 11
    if rewrite:
        kept = _without_cookies(c, opt_start + 11, opt_end, NULL, &had_cookie)
        if kept < 0:
            return -1
        had_cookie = had_cookie and e.cookie_size  # the backend does cookies, and the client sent one
        options = kept + (4 + _CLIENT_COOKIE if had_cookie else 0)
        if options > 0xFFFF:
            return -1  # (cache.answer's pack raises: a reply that long is past 65535 bytes anyway)
        total = opt_start + 11 + options + cn - opt_end
    else:
        total = cn
    if total > (0xFFFF if tcp else e.payload):
        return -1
    if out != q:
        memcpy(out, q, 2)
        memcpy(out + 12, q + 12, end - 12)
    memcpy(out + 2, c + 2, 10)  # the client's ID and question, the rest the cached reply's
    if not rewrite:
        memcpy(out + end, c + end, cn - end)
        return total
    memcpy(out + end, c + end, opt_start + 9 - end)
    pos = opt_start + 9
    out[pos] = options >> 8
    out[pos + 1] = options & 0xFF
    pos += 2
    _without_cookies(c, opt_start + 11, opt_end, out + pos, &rewrite)  # (rewrite: read no more)
    pos += kept
    if had_cookie:  # the client's own cookie, last
        out[pos] = _OPTION_COOKIE >> 8
        out[pos + 1] = _OPTION_COOKIE & 0xFF
        out[pos + 2] = 0
        out[pos + 3] = _CLIENT_COOKIE
        memcpy(out + pos + 4, e.cookie, _CLIENT_COOKIE)
        pos += 4 + _CLIENT_COOKIE
    memcpy(out + pos, c + opt_end, cn - opt_end)
    return total


def cache_key(bytes query, Py_ssize_t end):
    """cache.key, as the compiled path makes it (for the tests)."""
    cdef unsigned char key[CACHE_KEY]
    cdef Py_ssize_t n = _cache_key(<const unsigned char *>PyBytes_AS_STRING(query), PyBytes_GET_SIZE(query), end, key)
    return PyBytes_FromStringAndSize(<char *>key, n) if n >= 0 else None


def cache_lifetime(bytes reply, double max_ttl, double max_negative_ttl):
    """cache.lifetime, as the compiled path reckons it (for the tests)."""
    cdef double value = _lifetime(<const unsigned char *>PyBytes_AS_STRING(reply), PyBytes_GET_SIZE(reply),
                                  max_ttl, max_negative_ttl)
    return value if value > 0 else None


def cache_storable(bytes reply):
    """cache.storable, as the compiled path stores a reply (for the tests)."""
    cdef const unsigned char *r = <const unsigned char *>PyBytes_AS_STRING(reply)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(reply)
    cdef Py_ssize_t size = _storable(r, n, NULL)
    if size < 0:
        return None
    out = PyBytes_FromStringAndSize(NULL, size)
    _storable(r, n, <unsigned char *>PyBytes_AS_STRING(out))
    return out


def cache_answer(bytes cached, bytes query, Py_ssize_t end, bint tcp=False):
    """cache.answer, as the compiled path answers a hit (for the tests)."""
    cdef int qend, opt_start, opt_end
    cdef const unsigned char *c = <const unsigned char *>PyBytes_AS_STRING(cached)
    cdef Py_ssize_t cn = PyBytes_GET_SIZE(cached), size
    cdef unsigned char *out = <unsigned char *>malloc(CACHE_ANSWER)
    if out == NULL:
        raise MemoryError()
    try:
        _parse_cached(c, cn, &qend, &opt_start, &opt_end)
        size = _answer(c, cn, qend, opt_start, opt_end, <const unsigned char *>PyBytes_AS_STRING(query),
                       PyBytes_GET_SIZE(query), end, tcp, out)
        return PyBytes_FromStringAndSize(<char *>out, size) if size >= 0 else None
    finally:
        free(out)


cdef int _by_order(const void *a, const void *b) noexcept nogil:
    cdef unsigned long long x = (<_Entry **>a)[0].order, y = (<_Entry **>b)[0].order
    return -1 if x < y else (1 if x > y else 0)


cdef bint _at_or_below(const unsigned char *name, Py_ssize_t n, const unsigned char *zone,
                       Py_ssize_t zn) noexcept nogil:
    """cache._at_or_below: ``name`` is ``zone`` or below it, label by label."""
    cdef Py_ssize_t pos = 0, cut = n - zn
    while pos < cut:
        pos += name[pos] + 1
    return pos == cut and memcmp(name + pos, zone, zn) == 0


cdef Py_ssize_t _key_name(const unsigned char *key, Py_ssize_t n) noexcept nogil:
    """cache.key_name: the length of the name a key begins with (-1: none
    there, which a key made by _cache_key never lacks)."""
    cdef Py_ssize_t pos = 0
    while pos < n and key[pos]:
        pos += key[pos] + 1
    return pos + 1 if pos < n else -1


cdef class PacketCache:
    """cache.PacketCache, its entries in C: the same methods, the same
    answers, the same evictions (test_cache_compiled runs both through the
    same operations). ``cache.Cache``'s parallel arrays are one array of
    slots (``_Entry``), taken from the free list, last freed first, else the
    next new one, and swept by the same CLOCK hand; its dict is an index of
    open addressing keyed by ``_Py_HashBytes`` of the key (keyed SipHash:
    nobody outside can aim keys at one run of buckets). Each entry's key and
    stored reply are one malloc'd block. Bytes are counted as the reference
    counts them, with ``CACHE_ENTRY_OVERHEAD`` per entry.

    Every thread of a worker uses it holding the GIL, and no code here that
    changes the table calls Python or lets the GIL go: the one Python call,
    the purge log's ``since`` (which may wait for its lock), is made before
    the table is touched, and only when the log's sequence number, one load
    from shared memory, has moved."""

    cdef _Entry *slots
    cdef Py_ssize_t nslots, room  # slots handed out (cache.Cache's len(_keys)), slots allocated
    cdef int *free_slots
    cdef Py_ssize_t nfree
    cdef _Bucket *index
    cdef size_t mask  # buckets - 1 (a power of two); 0 with no index yet
    cdef Py_ssize_t count, hand
    cdef long long nbytes
    cdef unsigned long long inserts
    cdef readonly long long size, max_bytes, evictions, expired
    cdef public double max_ttl, max_negative_ttl, purged_at
    cdef public long long hits, misses
    cdef object purges  # the PurgeLog, or None
    cdef const void *seq_at  # its sequence number, in shared memory; NULL: no log
    cdef unsigned long long seen
    cdef dict purge_counts, purged_counts  # by cause: cache.Cache's purges and purged

    def __cinit__(self, long long size, long long max_bytes, double max_ttl, double max_negative_ttl, purges=None):
        self.size = size
        self.max_bytes = max_bytes
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        self.purged_at = float("-inf")
        self.purges = purges
        if purges is not None:
            self.seen = purges.seq
            self.seq_at = <const void *><size_t>purges.address()
        self.purge_counts = {}
        self.purged_counts = {}

    def __dealloc__(self):
        self.clear()
        free(self.slots)
        free(self.free_slots)
        free(self.index)

    @property
    def entries(self):
        return self.count

    # -- the table: C only, no Python call, the GIL held throughout ----------

    cdef void clear(self) noexcept nogil:
        cdef Py_ssize_t i
        for i in range(self.nslots):
            free(self.slots[i].block)
            self.slots[i].block = NULL
        for i in range(<Py_ssize_t>self.mask + 1 if self.index != NULL else 0):
            self.index[i].slot = -1
        self.nslots = self.nfree = self.count = self.hand = 0
        self.nbytes = 0

    cdef Py_ssize_t find(self, const unsigned char *key, Py_ssize_t n, unsigned int tag) noexcept nogil:
        """The bucket of ``key``, -1 if it is not there."""
        cdef size_t i
        cdef _Bucket *bucket
        cdef _Entry *entry
        if self.index == NULL:
            return -1
        i = tag & self.mask
        while True:
            bucket = self.index + i
            if bucket.slot < 0:
                return -1
            if bucket.tag == tag:
                entry = self.slots + bucket.slot
                if entry.key_size == n and memcmp(entry.block, key, n) == 0:
                    return <Py_ssize_t>i
            i = (i + 1) & self.mask

    cdef void remove(self, int slot) noexcept nogil:
        """cache.Cache._remove: the entry out of the index, its block freed, its slot freed last."""
        cdef _Entry *entry = self.slots + slot
        cdef size_t i = entry.tag & self.mask, j, home
        while self.index[i].slot != slot:
            i = (i + 1) & self.mask
        j = i
        while True:  # backward shift: no tombstones, so a miss ends at the first empty bucket
            j = (j + 1) & self.mask
            if self.index[j].slot < 0:
                break
            home = self.index[j].tag & self.mask
            if ((j - home) & self.mask) >= ((j - i) & self.mask):  # its home is not in (i, j]: it may move back
                self.index[i] = self.index[j]
                i = j
        self.index[i].slot = -1
        self.nbytes -= entry.key_size + entry.reply_size + _OVERHEAD
        free(entry.block)
        entry.block = NULL
        self.free_slots[self.nfree] = slot
        self.nfree += 1
        self.count -= 1

    cdef void evict(self, double now) noexcept nogil:
        """cache.Cache._evict: the first entry at or after the hand that has
        expired or whose bit is clear; bits set on the way are cleared."""
        cdef Py_ssize_t slot, n = self.nslots
        cdef _Entry *entry
        while True:
            slot = self.hand
            self.hand = (slot + 1) % n
            entry = self.slots + slot
            if entry.block == NULL:
                continue
            if entry.referenced and now < entry.expires:
                entry.referenced = 0
                continue
            self.remove(<int>slot)
            self.evictions += 1
            return

    cdef bint grow(self) noexcept nogil:
        """Room for one entry more, in the slots and the index (kept at most
        half full); False if malloc has none."""
        cdef Py_ssize_t room, i
        cdef size_t buckets, j
        cdef void *p
        cdef _Bucket *index
        if self.nslots == self.room and self.room < self.size:
            room = min(max(self.room + self.room // 4, 16), self.size)  # a quarter: little room idle
            p = realloc(self.slots, room * sizeof(_Entry))
            if p == NULL:
                return False
            self.slots = <_Entry *>p
            p = realloc(self.free_slots, room * sizeof(int))
            if p == NULL:
                return False
            self.free_slots = <int *>p
            self.room = room
        if self.index == NULL or <size_t>(self.count + 1) * 2 > self.mask + 1:
            buckets = 2 * (self.mask + 1) if self.index != NULL else 32
            index = <_Bucket *>malloc(buckets * sizeof(_Bucket))
            if index == NULL:
                return False
            for j in range(buckets):
                index[j].slot = -1
            for i in range(self.nslots):
                if self.slots[i].block != NULL:
                    j = self.slots[i].tag & (buckets - 1)
                    while index[j].slot >= 0:
                        j = (j + 1) & (buckets - 1)
                    index[j].tag = self.slots[i].tag
                    index[j].slot = <int>i
            free(self.index)
            self.index = index
            self.mask = buckets - 1
        return True

    cdef bint put(self, unsigned char *block, Py_ssize_t key_size, Py_ssize_t reply_size,
                  double now, double life) noexcept nogil:
        """cache.Cache.put of the key and stored reply in ``block``, which
        the cache takes (and frees, if it does not keep it)."""
        cdef Py_ssize_t cost = key_size + reply_size + _OVERHEAD, found, slot
        cdef unsigned int tag = <unsigned int><size_t>_Py_HashBytes(block, key_size)
        cdef _Entry *entry
        found = self.find(block, key_size, tag)
        if found >= 0:
            self.remove(self.index[found].slot)
        if self.size <= 0 or cost > self.max_bytes or not self.grow():
            free(block)
            return False
        while self.count >= self.size or self.nbytes + cost > self.max_bytes:
            self.evict(now)
        if self.nfree:
            self.nfree -= 1
            slot = self.free_slots[self.nfree]
        else:
            slot = self.nslots
            self.nslots += 1
        entry = self.slots + slot
        entry.block = block
        entry.key_size = <unsigned short>key_size
        entry.reply_size = <unsigned int>reply_size
        entry.expires = now + life
        entry.referenced = 0
        entry.tag = tag
        entry.order = self.inserts
        self.inserts += 1
        _parse_cached(block + key_size, reply_size, &entry.qend, &entry.opt_start, &entry.opt_end)
        found = tag & self.mask
        while self.index[found].slot >= 0:
            found = (found + 1) & self.mask
        self.index[found].tag = tag
        self.index[found].slot = <int>slot
        self.count += 1
        self.nbytes += cost
        return True

    cdef Py_ssize_t purge(self, const unsigned char *name, Py_ssize_t n, bint subtree) except -1:
        """cache.Cache.purge (uncounted): the entries of ``name``, or at or
        below it; how many went. In the order they went in, as the
        reference's dict has them, so that the free list is the same."""
        cdef _Entry **found = <_Entry **>malloc((self.count + 1) * sizeof(_Entry *))
        cdef Py_ssize_t i, owner, removed = 0
        cdef _Entry *entry
        if found == NULL:
            raise MemoryError()
        for i in range(self.nslots):
            entry = self.slots + i
            if entry.block == NULL:
                continue
            owner = _key_name(entry.block, entry.key_size)
            if owner < 0:
                continue
            if (owner == n and memcmp(entry.block, name, n) == 0) or \
                    (subtree and _at_or_below(entry.block, owner, name, n)):
                found[removed] = entry
                removed += 1
        qsort(found, removed, sizeof(_Entry *), _by_order)
        for i in range(removed):
            self.remove(<int>(found[i] - self.slots))
        free(found)
        return removed

    cdef void counted(self, cause, Py_ssize_t removed):
        """cache.Cache._count_purge, once the table is whole again."""
        self.purge_counts[cause] = self.purge_counts.get(cause, 0) + 1
        self.purged_counts[cause] = self.purged_counts.get(cause, 0) + removed

    cdef int sync(self) except -1:
        """cache.PacketCache._sync: the purges written since the last look.
        ``since`` may let the GIL go, and another thread apply some of them
        meanwhile: what is applied is only what is still newer than ``seen``."""
        cdef unsigned long long before = self.seen, seq
        cdef Py_ssize_t skip
        if self.seq_at == NULL or _load_seq(self.seq_at) == before:
            return 0
        seq, new = self.purges.since(before)
        if seq <= self.seen:
            return 0
        skip = self.seen - before
        self.seen = seq
        if new is None:
            self.purged_at = _monotonic()
            removed = self.count
            self.clear()
            self.counted("behind", removed)
            return 0
        for purge in new[skip:]:
            self.purged_at = max(self.purged_at, <double>purge.at)
            name = purge.name
            self.counted(purge.cause, self.purge(<const unsigned char *>PyBytes_AS_STRING(name),
                                                 PyBytes_GET_SIZE(name), purge.subtree))
        return 0

    # -- what the packet paths call -------------------------------------------

    cdef Py_ssize_t answer_into(self, const unsigned char *query, Py_ssize_t n, Py_ssize_t end, bint tcp,
                                double now, unsigned char *out) except -2:
        """cache.PacketCache.lookup written into ``out`` (CACHE_ANSWER bytes
        of room, or the query's own slot): its length, -1 for None. A miss is
        one key made, hashed and looked up, in C."""
        cdef unsigned char key[CACHE_KEY]
        cdef Py_ssize_t size = _cache_key(query, n, end, key), found
        cdef _Entry *entry
        if size < 0:
            return -1
        if self.seq_at != NULL and _load_seq(self.seq_at) != self.seen:
            self.sync()
        found = self.find(key, size, <unsigned int><size_t>_Py_HashBytes(key, size))
        if found >= 0:
            entry = self.slots + self.index[found].slot
            if now < entry.expires:
                entry.referenced = 1
                size = _answer(entry.block + entry.key_size, entry.reply_size, entry.qend, entry.opt_start,
                               entry.opt_end, query, n, end, tcp, out)
                if size >= 0:
                    self.hits += 1
                    return size
            else:
                self.remove(self.index[found].slot)
                self.expired += 1
        self.misses += 1
        return -1

    cdef bint insert_from(self, const unsigned char *query, Py_ssize_t n, Py_ssize_t end,
                          const unsigned char *reply, Py_ssize_t rn, double now, double sent) except -1:
        """cache.PacketCache.insert, of bytes wherever they are."""
        cdef unsigned char key[CACHE_KEY]
        cdef Py_ssize_t size = _cache_key(query, n, end, key), stored
        cdef double life
        cdef unsigned char *block
        if size < 0:
            return False
        life = _lifetime(reply, rn, self.max_ttl, self.max_negative_ttl)
        if life <= 0:
            return False
        stored = _storable(reply, rn, NULL)
        if stored < 0:
            return False
        if self.seq_at != NULL and _load_seq(self.seq_at) != self.seen:
            self.sync()
        if sent < self.purged_at:
            return False
        block = <unsigned char *>malloc(size + stored)
        if block == NULL:
            return False  # as if it could not fit
        memcpy(block, key, size)
        _storable(reply, rn, block + size)
        return self.put(block, size, stored, now, life)

    def lookup(self, bytes query, Py_ssize_t end, bint tcp, double now):
        """cache.PacketCache.lookup."""
        cdef unsigned char *out = <unsigned char *>malloc(CACHE_ANSWER)
        cdef Py_ssize_t size
        if out == NULL:
            raise MemoryError()
        try:
            size = self.answer_into(<const unsigned char *>PyBytes_AS_STRING(query), PyBytes_GET_SIZE(query),
                                    end, tcp, now, out)
            return PyBytes_FromStringAndSize(<char *>out, size) if size >= 0 else None
        finally:
            free(out)

    def insert(self, bytes query, Py_ssize_t end, bytes reply, double now, double sent):
        """cache.PacketCache.insert."""
        return self.insert_from(<const unsigned char *>PyBytes_AS_STRING(query), PyBytes_GET_SIZE(query), end,
                                <const unsigned char *>PyBytes_AS_STRING(reply), PyBytes_GET_SIZE(reply),
                                now, sent)

    def purge_all(self, cause):
        """cache.PacketCache.purge_all: forget everything; how many went."""
        self.purged_at = _monotonic()
        removed = self.count
        self.clear()
        self.counted(cause, removed)
        return removed

    def snapshot(self):
        """cache.PacketCache.snapshot: totals since the start, keyed as counts are."""
        out = {("cache_lookups", "hit"): self.hits, ("cache_lookups", "miss"): self.misses,
               ("cache_evictions", "room"): self.evictions, ("cache_evictions", "expired"): self.expired}
        for cause, n in self.purge_counts.items():
            out["cache_purges", cause] = n
        for cause, n in self.purged_counts.items():
            out["cache_purged", cause] = n
        return {k: v for k, v in out.items() if v}

    @property
    def bytes(self):
        return self.nbytes


# -- the client side -----------------------------------------------------------

# -- rate limits (issue 28) ------------------------------------------------------
#
# dnsrouter/ratelimit.py's accounts, in C, on the same shared table: the
# hash, the network, the GCRA charge and the RRL account of a reply, each
# naming the function it mirrors (tests/test_ratelimit.py holds them to it).
# The charge is lock-free: the account's tat moves by compare-and-swap, so
# two workers charging one account at once both count.

from dnsrouter import ratelimit as _ratelimit

if _ratelimit.WAYS != RATE_WAYS:
    raise ImportError("ratelimit.WAYS and _fastpath.pxd's RATE_WAYS differ")
_LIMIT_KEYS = (_key("dropped", "client_qps"), _key("rrl", "dropped"), _key("rrl", "slipped")) + tuple(
    _key("rrl_limited", kind) for kind in _ratelimit.KINDS)
if len(_LIMIT_KEYS) != LIMIT_COUNTS:
    raise ImportError("the limits' counter keys and _fastpath.pxd's LIMIT_COUNTS differ")
cdef Py_ssize_t _RATE_HEAD = _ratelimit.HEAD

cdef unsigned long long _hash64(unsigned long long seed, const unsigned char *p, Py_ssize_t n) noexcept nogil:
    """ratelimit.hash64."""
    cdef unsigned long long h = seed ^ (<unsigned long long>n * 0x9E3779B97F4A7C15ULL), w
    cdef Py_ssize_t at = 0, k
    while at < n:
        w = 0
        for k in range(min(8, n - at)):
            w |= (<unsigned long long>p[at + k]) << (8 * k)
        h = (h ^ w) * 0xBF58476D1CE4E5B9ULL
        h ^= h >> 31
        at += 8
    h *= 0x94D049BB133111EBULL
    h ^= h >> 32
    return h if h else 1


cdef Py_ssize_t _network(const unsigned char *addr, Py_ssize_t n, int ipv4_prefix, int ipv6_prefix,
                         unsigned char *out) noexcept nogil:
    """ratelimit.network, written to ``out``: its length, -1 for None."""
    cdef unsigned int family = addr[0] | addr[1] << 8 if n >= 2 else 0
    cdef unsigned long long bits = 0
    cdef int i
    if family == 2 and n >= 8:
        for i in range(4):
            bits = bits << 8 | addr[4 + i]
        bits &= (0xFFFFFFFFFFFFFFFFULL << (32 - ipv4_prefix)) & 0xFFFFFFFFULL
        out[0] = 4
        for i in range(4):
            out[1 + i] = (bits >> (24 - 8 * i)) & 0xFF
        return 5
    if family == 10 and n >= 24:
        for i in range(8):
            bits = bits << 8 | addr[8 + i]
        bits &= 0xFFFFFFFFFFFFFFFFULL << (64 - ipv6_prefix) if ipv6_prefix else 0
        out[0] = 6
        for i in range(8):
            out[1 + i] = (bits >> (56 - 8 * i)) & 0xFF
        return 9
    return -1


cdef bint _charge(_RateSlot *slots, unsigned long long buckets, unsigned long long h, long long now,
                  long long interval, long long burst, long long window) noexcept nogil:
    """RateTable.charge for the account whose key hashes to ``h``."""
    cdef _RateSlot *bucket = slots + (h & (buckets - 1)) * RATE_WAYS
    cdef _RateSlot *slot
    cdef _RateSlot *victim
    cdef unsigned long long key, victim_key = 0
    cdef long long tat, least = 0, new
    cdef int way
    cdef bint allowed
    while True:  # RateTable._find
        slot = victim = NULL
        for way in range(RATE_WAYS):
            key = _load_u64(&bucket[way].key)
            if key == h:
                slot = bucket + way
                break
            tat = _load_i64(&bucket[way].tat)
            if victim == NULL or tat < least:
                victim, victim_key, least = bucket + way, key, tat
        if slot != NULL:
            break
        if _cas_u64(&victim.key, victim_key, h):  # ours now; another worker's claim: look again
            while True:  # a new account: tat 0 (a charge of the old one may land after: it is forgotten)
                tat = _load_i64(&victim.tat)
                if _cas_i64(&victim.tat, tat, 0):
                    break
            slot = victim
            break
    while True:
        tat = _load_i64(&slot.tat)
        new = tat if tat > now else now
        allowed = new + interval - now <= burst * interval
        if not allowed and not window:
            return False
        new += interval
        if window and new > now + window:
            new = now + window
        if _cas_i64(&slot.tat, tat, new):
            return allowed


cdef class _Accounts:
    """What the two limits share: the table (mapped by ``ratelimit.RateTable``,
    kept alive here), the networks' prefixes, the exempt test."""

    cdef object table
    cdef Networks exempt  # None: nobody
    cdef _RateSlot *slots
    cdef unsigned long long buckets, seed
    cdef int ipv4_prefix, ipv6_prefix

    def __cinit__(self, table, *args):
        self.table = table
        self.slots = <_RateSlot *><size_t>(table.address() + _RATE_HEAD)
        self.buckets, self.seed = table.buckets, table.seed

    cdef inline Py_ssize_t network(self, const unsigned char *addr, Py_ssize_t n, unsigned char *out) noexcept:
        """The client's network, -1: not one to limit (another family, or exempt)."""
        cdef Py_ssize_t size = _network(addr, n, self.ipv4_prefix, self.ipv6_prefix, out)
        if size < 0 or (self.exempt is not None and self.exempt.contains(addr, n)):
            return -1
        return size


cdef class QueryLimit(_Accounts):
    """ratelimit.QueryLimit."""

    cdef long long interval, burst

    def __init__(self, table, int qps, int burst, int ipv4_prefix, int ipv6_prefix, exempt):
        self.interval = 1_000_000_000 // qps
        self.burst = burst or qps
        self.ipv4_prefix, self.ipv6_prefix = ipv4_prefix, ipv6_prefix
        self.exempt = Networks(exempt) if exempt else None

    cdef bint admit(self, const unsigned char *addr, Py_ssize_t n, long long now) except -1:
        cdef unsigned char net[16]
        cdef Py_ssize_t size = self.network(addr, n, net)
        if size < 0:
            return True
        return _charge(self.slots, self.buckets, _hash64(self.seed, net, size), now, self.interval, self.burst, 0)

    def allow(self, bytes addr, long long now):
        return self.admit(<const unsigned char *>PyBytes_AS_STRING(addr), PyBytes_GET_SIZE(addr), now)


cdef Py_ssize_t _read_name(const unsigned char *p, Py_ssize_t n, Py_ssize_t pos, unsigned char *out) noexcept nogil:
    """ratelimit.read_name, lower-cased (as its callers lower it) into
    ``out`` (room for 256 bytes): its length, -1 for None."""
    cdef Py_ssize_t size = 0, i
    cdef int hops
    cdef unsigned char length
    for hops in range(128):
        if pos >= n:
            return -1
        length = p[pos]
        if length & 0xC0 == 0xC0:
            if pos + 1 >= n:
                return -1
            pos = (length & 0x3F) << 8 | p[pos + 1]
            continue
        if length > 63:
            return -1
        if length == 0:
            out[size] = 0
            return size + 1 if size < 255 else -1
        if pos + 1 + length > n or size + 1 + length > 255:  # longer than 255 in the end: None
            return -1
        out[size] = length
        for i in range(length):
            out[size + 1 + i] = _lower(p[pos + 1 + i])
        size += 1 + length
        pos += 1 + length
    return -1


cdef Py_ssize_t _soa_owner(const unsigned char *r, Py_ssize_t n, Py_ssize_t end, unsigned char *out) noexcept nogil:
    """ratelimit.soa_owner, lower-cased into ``out``: its length, -1 for None."""
    cdef unsigned int an = _u16(r + 6), ns = _u16(r + 8), index
    cdef Py_ssize_t pos = end, owner
    for index in range(an + ns):
        owner = pos
        pos = _skip_name(r, n, pos)
        if pos < 0 or pos + 10 > n:
            return -1
        if index >= an and _u16(r + pos) == _TYPE_SOA:
            return _read_name(r, n, owner, out)
        pos += 10 + _u16(r + pos + 8)
    return -1


cdef Py_ssize_t _account(const unsigned char *r, Py_ssize_t n, unsigned char *out) noexcept nogil:
    """ratelimit.account: the kind in ``out[0]``, then what tells accounts
    of the kind apart; the length written."""
    cdef unsigned int rcode = r[3] & 0xF
    cdef Py_ssize_t end, size, i
    if rcode != 0 and rcode != 3:
        out[0] = 2  # ERRORS
        return 1
    end = _question_end(r, n)
    if end < 0 or r[4] or r[5] != 1:
        out[0] = 2
        return 1
    if rcode == 0:
        out[0] = 0  # RESPONSES: the name, type and class (as they are: 65 is no 97)
        for i in range(end - 16):
            out[1 + i] = _lower(r[12 + i])
        memcpy(out + 1 + end - 16, r + end - 4, 4)
        return 1 + end - 12
    out[0] = 1  # NXDOMAINS: the zone
    size = _soa_owner(r, n, end, out + 1)
    if size < 0:
        for i in range(end - 16):
            out[1 + i] = _lower(r[12 + i])
        size = end - 16
    return 1 + size


def rate_hash(unsigned long long seed, bytes data):
    return _hash64(seed, <const unsigned char *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))


def rate_network(bytes addr, int ipv4_prefix, int ipv6_prefix):
    cdef unsigned char out[16]
    cdef Py_ssize_t size = _network(<const unsigned char *>PyBytes_AS_STRING(addr), PyBytes_GET_SIZE(addr),
                                    ipv4_prefix, ipv6_prefix, out)
    return PyBytes_FromStringAndSize(<char *>out, size) if size >= 0 else None


def rate_account(bytes reply):
    """ratelimit.account's kind and detail, as one key: kind byte + detail."""
    cdef unsigned char out[RATE_KEY]
    if PyBytes_GET_SIZE(reply) < 12:
        raise ValueError("shorter than a header")
    return PyBytes_FromStringAndSize(<char *>out, _account(<const unsigned char *>PyBytes_AS_STRING(reply),
                                                           PyBytes_GET_SIZE(reply), out))


cdef class ResponseLimit(_Accounts):
    """ratelimit.ResponseLimit."""

    cdef long long intervals[3]
    cdef long long rates[3]
    cdef long long window
    cdef public long long limited  # limited responses in this worker, for the slip
    cdef int slip

    def __init__(self, table, rates, int slip, int window, int ipv4_prefix, int ipv6_prefix, exempt):
        cdef int kind
        for kind in range(3):
            self.rates[kind] = rates[kind]
            self.intervals[kind] = 1_000_000_000 // rates[kind] if rates[kind] else 0
        self.slip = slip
        self.window = window * 1_000_000_000LL
        self.ipv4_prefix, self.ipv6_prefix = ipv4_prefix, ipv6_prefix
        self.exempt = Networks(exempt) if exempt else None

    cdef int limit(self, unsigned char *reply, Py_ssize_t *size, const unsigned char *addr, Py_ssize_t n,
                   long long now) except -2:
        """ResponseLimit.check in place: -1, send the reply as it is; else
        the kind of account that limited it, and ``size`` 0 (drop it) or
        that of its truncated form, written over it."""
        cdef unsigned char key[RATE_KEY]
        cdef Py_ssize_t length = size[0], net, end
        cdef int kind
        if length < 12:
            return -1
        net = self.network(addr, n, key)
        if net < 0:
            return -1
        length = net + _account(reply, length, key + net)
        kind = key[net]
        if not self.intervals[kind] or _charge(self.slots, self.buckets, _hash64(self.seed, key, length), now,
                                               self.intervals[kind], self.rates[kind], self.window):
            return -1
        self.limited += 1
        if not self.slip or self.limited % self.slip:
            size[0] = 0
            return kind
        end = _question_end(reply, size[0])  # ratelimit.truncated
        if end < 0 or reply[4] or reply[5] != 1:
            end = 12
        reply[2] |= 0x02
        reply[4] = 0
        reply[5] = end > 12
        memset(reply + 6, 0, 6)
        size[0] = end
        return kind

    def check(self, bytes reply, bytes addr, long long now):
        cdef bytearray out = bytearray(reply)
        cdef Py_ssize_t size = len(out)
        cdef int kind = self.limit(<unsigned char *><char *>out, &size, <const unsigned char *>PyBytes_AS_STRING(addr),
                                   PyBytes_GET_SIZE(addr), now)
        if kind < 0:
            return reply, -1
        return (bytes(out[:size]) if size else None), kind


cdef class Pending:
    """``upstream.Pending`` as a C struct: one query waiting for a backend's
    reply. The forwarder makes its entries of this class while the fast path
    runs (``Forwarder.Pending``), so that the compiled loops read and write
    the fields without a look-up; Python code uses them as it uses
    upstream.Pending's slots, which these fields repeat one for one (see
    there for what each means)."""

    cdef public object client, addr, pool, backend, retry_backend, variants, ecs_added
    cdef public bytes query, question
    cdef public bint strip_opt, tcp, done
    cdef public double sent, retry_at, retry_sent
    cdef public int uid, retry_uid

    def __init__(self, client, addr, bytes query, bytes question, pool, backend, bint strip_opt, bint tcp):
        _fill(self, client, addr, query, question, pool, backend)
        self.strip_opt = strip_opt
        self.tcp = tcp


cdef inline Pending _fill(Pending entry, client, addr, bytes query, bytes question, pool, backend):
    entry.client = client
    entry.addr = addr
    entry.query = query
    entry.question = question
    entry.pool = pool
    entry.backend = backend
    entry.uid = -1
    entry.retry_backend = backend
    entry.retry_uid = -1
    return entry  # the rest as __new__ leaves it: 0, False, None


cdef class _Queries:
    """The client side of one listening socket (``udp.serve``'s batch,
    compiled): its receiver and what its loop reads of the forwarder."""

    cdef Receiver receiver
    cdef object forwarder, counts, stopping, client, failed, handle
    cdef dict upstreams, rtos  # the forwarder's tables: filled in place, never replaced
    cdef Counters counters
    cdef dict peers
    cdef RouteCache routes
    cdef PacketCache cache  # the forwarder's, or None: the cache is off
    cdef QueryLimit limits  # the forwarder's [limits] and [rrl], or None: off
    cdef ResponseLimit rrl
    cdef long long batch_ns  # the batch's time for the limits (CLOCK_MONOTONIC ns)
    cdef int client_fd
    cdef Networks allow, notify  # [server] allow (None: everyone), [cache] notify_allow
    cdef _Policy policy  # the two for _decide, and deny_action
    cdef int no_route  # the rcode of a query no pool is there for ([forward] no_route)
    # Per datagram of a batch: what _decide made of it, the question's hash, the question lower-cased.
    cdef _Verdict *verdicts
    cdef Py_hash_t *hashes
    cdef unsigned char *keys

    def __cinit__(self, sock, forwarder, counts, Counters counters, stopping, client, failed):
        self.receiver = Receiver(sock, wait=False)
        self.forwarder = forwarder
        self.counts = counts
        self.counters = counters
        self.stopping = stopping
        self.client = client
        self.failed = failed
        self.handle = forwarder.handle
        self.upstreams, self.rtos = forwarder.upstreams, forwarder.rtos
        self.peers = {}  # backend -> (raw address, family), for the worker's few backends
        self.routes = RouteCache()
        # Read once: while the fast path runs the forwarder's cache is one of ours (None: off).
        self.cache = forwarder.cache
        self.limits, self.rrl = forwarder.limits, forwarder.rrl
        self.client_fd = client.fd
        # Not live settings: read once, the networks matched in C.
        self.allow = Networks(forwarder.allow) if forwarder.allow else None
        self.notify = Networks(forwarder.notify_allow)
        self.policy.allow = &self.allow.c if self.allow is not None else NULL
        self.policy.drop_denied = forwarder.deny_action == "drop"
        self.policy.notify = &self.notify.c
        self.no_route = forwarder.no_route
        cdef size_t n = self.receiver.n
        self.verdicts = <_Verdict *>malloc(n * sizeof(_Verdict))
        self.hashes = <Py_hash_t *>malloc(n * sizeof(Py_hash_t))
        self.keys = <unsigned char *>malloc(n * KEY)
        if self.verdicts == NULL or self.hashes == NULL or self.keys == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.verdicts)
        free(self.hashes)
        free(self.keys)

    cdef bint take(self, Outbox outbox) except -1:
        """Forward what waits on the socket (a batch at most); False once the
        socket is shut down and drained."""
        cdef Receiver receiver = self.receiver
        cdef Counters counters = self.counters
        cdef int got, i, end, uid, taken = 0, slot, fd = -1
        cdef Py_ssize_t limit = 0
        cdef unsigned char *slot_data
        cdef Py_ssize_t length, size
        cdef PyObject *found
        cdef _Way *way
        cdef double now, batch_time = 0
        cdef Pending entry
        cdef PacketCache cache = self.cache
        cdef QueryLimit limits = self.limits
        cdef _Verdict *verdict
        cdef bint query_log
        try:
            got = receiver.wait()
        except OSError as e:  # EAGAIN: nothing there (a read of a socket shut down does not say so)
            return e.errno == EINTR or not self.stopping.is_set()
        with nogil:
            for i in range(got):
                verdict = self.verdicts + i
                _decide(receiver.data(i), receiver.length(i), receiver.name(i), receiver.name_length(i),
                        &self.policy, self.keys + i * KEY, verdict)
                if verdict.action == FORWARD:
                    self.hashes[i] = _Py_HashBytes(self.keys + i * KEY, verdict.end - 12)
        forwarder = self.forwarder
        handle = self.handle
        client = self.client
        counts = self.counts
        peers = self.peers
        # Read once a batch: a new table or setting takes effect from the next batch.
        self.routes.use(forwarder.matcher)
        query_log = forwarder.query_log  # every query to route goes to Python, which logs it (counted)
        by_family = self.upstreams
        rtos = self.rtos
        last_pool = last_upstream = _UNSET  # None is a pool (no route) and gets its check
        cycle = pending = waiting_by = None
        if cache is not None:
            batch_time = _monotonic()
        if limits is not None or self.rrl is not None:
            self.batch_ns = _monotonic_ns()
        for i in range(got):
            length = receiver.length(i)
            verdict = self.verdicts + i
            end = verdict.end
            slot_data = <unsigned char *>receiver.data(i)
            # [limits], as Forwarder._handle: after the short and QR drops, before anything costs
            if limits is not None and not (verdict.action == DROP and verdict.reason != DROPPED_ACL) and \
                    not limits.admit(receiver.name(i), receiver.name_length(i), self.batch_ns):
                counters.fixed[QUERIES] += 1
                counters.limits[CLIENT_QPS] += 1
                continue
            if verdict.action == TO_PYTHON or (query_log and verdict.action == FORWARD):
                counters.handoffs[verdict.reason if verdict.action == TO_PYTHON else QUERY_LOG] += 1
                handle(receiver.payload(i), receiver.peer(i), client, counts, outbox=outbox, admitted=True)
                continue
            try:
                if verdict.action != FORWARD:  # decided here: dropped or answered
                    _count_verdict(counters, verdict)
                    if verdict.action == ANSWER:
                        self.answer(outbox, i, verdict.rcode, end, verdict.echo)
                    continue
                way = self.routes.find(self.keys + i * KEY, end - 12, self.hashes[i])
                question, pool = <object>way.question, <object>way.pool  # ours: a later miss may reuse the way
                if pool is not last_pool:  # a batch is mostly one pool's: its attributes read once
                    if pool is None:  # no route, or no usable backend: [forward] no_route
                        taken += 1
                        self.answer(outbox, i, self.no_route, end, True)
                        continue
                    if pool.modes:  # a member that learns the client's address
                        counters.handoffs[CLIENT_ADDRESS] += 1
                        handle(receiver.payload(i), receiver.peer(i), client, counts, outbox=outbox,
                               admitted=True)
                        continue
                    last_pool, cycle = pool, pool.rotation
                taken += 1
                if cache is not None:
                    # A hit is answered in the slot the query came in (its ID and
                    # question are there already): no object made, nothing forwarded.
                    size = cache.answer_into(slot_data, length, end, False, batch_time, slot_data)
                    if size >= 0:
                        self.respond(outbox, i, slot_data, size)
                        continue
                data = receiver.payload(i)
                addr = receiver.peer(i)
                backend = next(cycle)  # Pool.next
                found = PyDict_GetItem(peers, backend)
                if found == NULL:
                    if len(peers) >= BACKENDS:
                        peers.clear()  # backends come and go over months: bounded
                    peers[backend] = peer = (_raw_address(backend), backend.family)
                else:
                    peer = <tuple>found
                found = PyDict_GetItem(by_family, peer[1])
                upstreams = <object>found if found != NULL else forwarder.upstreams_for(peer[1])
                upstream = upstreams[outbox.pick % len(upstreams)]
                if upstream is not last_upstream:  # one per batch, unless the outbox filled up
                    last_upstream = upstream
                    pending, waiting_by, limit, fd = upstream.pending, upstream.waiting, upstream.limit, upstream.fd
                if len(pending) >= limit:
                    counters.fixed[IN_FLIGHT] += 1
                    continue
                entry = _fill(Pending.__new__(Pending), client, addr, data, question, pool, backend)
                # Upstream.send: times first, the owner thread may look at the entry as soon as it is in
                entry.sent = now = _monotonic()
                found = PyDict_GetItem(rtos, backend)
                entry.retry_at = now + (<double>(<object>found) if found != NULL else forwarder.timeout / 2)
                while True:
                    uid = outbox.random_id()
                    entry.uid = uid
                    if PyDict_SetDefault(pending, uid, entry) == <PyObject *>entry:
                        break
                found = PyDict_GetItem(waiting_by, backend)
                waiting = <object>found if found != NULL else waiting_by.setdefault(backend, _deque())
                waiting.append(entry)
                raw = peer[0]
                slot_data[0] = uid >> 8  # our ID in the slot: entry.query keeps the client's
                slot_data[1] = uid & 0xFF
                outbox.add_from(fd, slot_data, length, <const unsigned char *>PyBytes_AS_STRING(raw),
                                PyBytes_GET_SIZE(raw))
                slot = counters.slot(backend)
                if slot >= 0:
                    counters.backend_queries[slot] += 1
                else:
                    _count(counts, ("backend_queries", backend))
            except Exception:  # a bug must cost one query, never the worker
                counters.fixed[ERROR] += 1
                self.failed()
        counters.fixed[QUERIES] += taken
        return True

    cdef int answer(self, Outbox outbox, int i, int rcode, Py_ssize_t end, bint echo) except -1:
        """The one place the compiled path queues an answer of its own: the
        datagram ``i`` of the batch answered with ``rcode`` (_own_answer, in
        its slot) and counted, as Forwarder._answer does, after [rrl]."""
        cdef Receiver receiver = self.receiver
        cdef unsigned char *slot_data = <unsigned char *>receiver.data(i)
        cdef Py_ssize_t size = _own_answer(slot_data, receiver.length(i), rcode, end, echo)
        self.respond(outbox, i, slot_data, size)
        return 0

    cdef inline int respond(self, Outbox outbox, int i, unsigned char *reply, Py_ssize_t size) except -1:
        """Forwarder._respond for an answer in the slot of datagram ``i``
        (the router's own, or from the cache): [rrl], counted, queued."""
        cdef Receiver receiver = self.receiver
        if self.rrl is not None and _rrl(self.rrl, self.counters, reply, &size, receiver.name(i),
                                         receiver.name_length(i), self.batch_ns):
            return 0
        self.counters.responses[reply[3] & 0xF] += 1
        outbox.add_from(self.client_fd, reply, size, receiver.name(i), receiver.name_length(i))
        return 0


cdef bint _rrl(ResponseLimit rrl, Counters counters, unsigned char *reply, Py_ssize_t *size,
               const unsigned char *addr, Py_ssize_t n, long long now) except -1:
    """Forwarder._respond's [rrl], counted: True when the answer is dropped."""
    cdef int kind = rrl.limit(reply, size, addr, n, now)
    if kind < 0:
        return False
    counters.limits[RRL_LIMITED + kind] += 1
    counters.limits[RRL_DROPPED if size[0] == 0 else RRL_SLIPPED] += 1
    return size[0] == 0


def serve(sock, forwarder, counts, Counters counters, stopping, client, failed, replies=()):
    """``udp.serve`` for one listening socket: forward every datagram until
    the socket is shut down. ``counts`` are the thread's own (for the
    Python path's work), ``counters`` what this loop counts itself, both
    read by the reporter. ``client`` is the socket's ``udp.UdpClient``;
    ``failed()`` logs the exception being handled. With ``replies``
    (``Replies`` of upstream sockets), the same thread serves those sockets
    too, until the listening socket is shut down; it returns the upstreams
    still open."""
    return _loop(_Queries(sock, forwarder, counts, counters, stopping, client, failed), list(replies))


# -- the reply side ------------------------------------------------------------

cdef class Replies:
    """The reply side of one upstream socket (``Upstream.serve``'s batch,
    compiled): its receiver and what its loop reads of the upstream.
    ``counters``, this socket's (``Upstream.counters``)."""

    cdef object upstream, pending, policy, counts
    cdef PacketCache cache  # the policy's (the forwarder's), or None: the cache is off
    cdef ResponseLimit rrl  # the policy's [rrl], or None: off
    cdef dict rtts, last_answered, rtos  # the policy's tables: filled in place, never replaced
    cdef double retry_min, half_timeout
    cdef Counters counters
    cdef Receiver receiver
    cdef double[::1] buckets
    cdef dict keys
    cdef double due
    cdef int got
    cdef bint closed

    def __cinit__(self, upstream, Counters counters):
        self.buckets = array.array("d", LATENCY_BUCKETS)
        if counters.nbuckets != self.buckets.shape[0] + 1:
            raise ValueError("the counters were made for other latency buckets")
        self.upstream = upstream
        self.counters = counters
        self.receiver = Receiver(upstream.sock, wait=False)
        self.pending = upstream.pending
        self.policy = upstream.policy
        self.counts = upstream.counts
        self.keys = {}  # backend -> the part of a raw address that names it
        self.rtts, self.last_answered, self.rtos = self.policy.rtts, self.policy.last_answered, self.policy.rtos
        self.cache = self.policy.cache
        self.rrl = self.policy.rrl

    cdef void answered(self, backend, double sent, double rtt) except *:
        """``Forwarder.answered`` (with stats.observe_latency and Rtt.sample),
        with the policy's tables as ``take`` read them for the batch."""
        cdef PyObject *found = PyDict_GetItem(self.rtts, backend)
        if found == NULL:  # the first sample: Forwarder.answered makes the estimate
            self.policy.answered(backend, sent, rtt, self.counts)
            return
        estimate = <object>found
        found = PyDict_GetItem(self.last_answered, backend)
        if found == NULL or sent > <double>(<object>found):
            self.last_answered[backend] = sent
        cdef Py_ssize_t i = 0, n = self.buckets.shape[0]
        while i < n and self.buckets[i] < rtt:  # bisect_left over a dozen bounds
            i += 1
        self.counters.buckets[i] += 1
        self.counters.latency_sum += rtt
        cdef double srtt = estimate.srtt, rttvar = estimate.rttvar
        rttvar = (1 - _BETA) * rttvar + _BETA * abs(srtt - rtt)  # Rtt.sample
        srtt = (1 - _ALPHA) * srtt + _ALPHA * rtt
        estimate.rttvar = rttvar
        estimate.srtt = srtt
        self.rtos[backend] = min(max(srtt + _K * rttvar, self.retry_min), self.half_timeout)  # Rtt.timeout

    cdef int take(self, double now, Outbox outbox) except -1:
        """Read what waits on the socket (a batch at most) and relay the replies."""
        cdef Receiver receiver = self.receiver
        cdef Counters counters = self.counters
        cdef int got, i, uid, slot, fd = -1
        cdef const unsigned char *p
        cdef Py_ssize_t length, size
        cdef PyObject *found
        cdef double sent
        cdef bint retry
        cdef Pending entry
        cdef PacketCache cache = self.cache
        cdef ResponseLimit rrl = self.rrl
        pending = self.pending
        keys = self.keys
        try:  # self.got is 0 here: the loop resets it after the clocks
            got = receiver.wait()
        except OSError as e:
            if e.errno in mmsg.STALE_ERRORS:
                self.upstream.errors(self.counts, outbox)
            return 0  # EAGAIN: someone read it first, or an error taken by a send
        self.got = got
        policy = self.policy
        self.retry_min, self.half_timeout = policy.retry_min, policy.timeout / 2
        last_client = _UNSET
        for i in range(got):
            p = receiver.data(i)
            length = receiver.length(i)
            if length < 12:
                counters.fixed[SHORT] += 1
                continue
            uid = p[0] << 8 | p[1]
            found = PyDict_GetItem(pending, uid)
            if found == NULL:
                counters.fixed[UNKNOWN] += 1
                continue
            entry = <Pending?>found  # the forwarder makes them all of this class while the fast path runs
            retry = uid == entry.retry_uid
            backend = entry.retry_backend if retry else entry.backend
            found = PyDict_GetItem(keys, backend)
            if found == NULL:
                if len(keys) >= BACKENDS:
                    keys.clear()  # backends come and go over months: bounded
                keys[backend] = key = _peer_key(backend)
            else:
                key = <object>found
            size = PyBytes_GET_SIZE(key)
            if size > receiver.name_size or memcmp(receiver.names + i * NAME, PyBytes_AS_STRING(key), size):
                counters.fixed[WRONG_SOURCE] += 1
                continue
            question = entry.question
            size = PyBytes_GET_SIZE(question)
            if not p[2] & 0x80 or length < 12 + size or \
                    not _same_question(p + 12, <const unsigned char *>PyBytes_AS_STRING(question), size):
                counters.fixed[WRONG_QUESTION] += 1
                continue
            PyDict_DelItem(pending, uid)
            sent = entry.retry_sent if retry else entry.sent
            self.answered(backend, sent, now - sent)
            if entry.done:
                slot = counters.slot(backend)  # the other try won, or the timeout
                if slot >= 0:
                    counters.late_replies[slot] += 1
                else:
                    _count(self.counts, ("late_replies", backend))
                continue
            entry.done = True
            if retry:  # the try that answered becomes the first: entry.backend answered
                entry.backend, entry.retry_backend = entry.retry_backend, entry.backend
                entry.uid, entry.retry_uid = entry.retry_uid, entry.uid
                entry.sent, entry.retry_sent = entry.retry_sent, entry.sent
            if entry.tcp or entry.variants is not None:
                self.policy.reply(entry, receiver.payload(i), self.counts, outbox)
                continue
            # Forwarder._relay for a query forwarded as it came: the client's ID back, in the slot
            query = entry.query
            addr = entry.addr
            memcpy(<unsigned char *>p, PyBytes_AS_STRING(query), 2)
            if cache is not None:
                # Cached as the client asked it (entry.query; its question ends where entry.question
                # does), as of when the answering try was sent. The ID in the slot is the client's
                # now; it is never served (a hit takes the asker's). Before [rrl], which may cut it.
                try:
                    cache.insert_from(<const unsigned char *>PyBytes_AS_STRING(query), PyBytes_GET_SIZE(query),
                                      12 + PyBytes_GET_SIZE(question), p, length, now, entry.sent)
                except Exception:  # the purge log's read: a bug must cost one insert, never the loop
                    counters.fixed[ERROR] += 1
            if rrl is not None:
                size = length
                if _rrl(rrl, counters, <unsigned char *>p, &size, <const unsigned char *>PyBytes_AS_STRING(addr),
                        PyBytes_GET_SIZE(addr), <long long>(now * 1e9)):
                    continue
                length = size
            counters.responses[p[3] & 0xF] += 1
            if entry.client is not last_client:  # a listening socket's, mostly the same one
                last_client = entry.client
                fd = last_client.fd
            outbox.add_from(fd, <unsigned char *>p, length, <const unsigned char *>PyBytes_AS_STRING(addr),
                            PyBytes_GET_SIZE(addr))
        return got

    cdef bint clocks(self, double now, double tick, bint rang, Outbox outbox) except -1:
        """``Upstream.tick``, every tick. ``rang``: the loop's timer says a
        tick has passed (it keeps its own time, a little ahead of ours or
        behind). True when the tick was due (then the loop looks at
        ``closing``)."""
        if now < self.due and not rang:
            return False
        self.due = now + tick
        if self.pending:  # tested here too: an idle worker's tick makes no Python call
            self.upstream.tick(now, self.counts, outbox, self.got >= _batch)
        return True


def due_retries(upstream, double now, counts, outbox):
    """``upstream.due_retries``, which ``Upstream.tick`` calls: every first
    try comes through its backend's queue once, most of them answered by
    then; only a try past its retry time goes to the Python method that
    sends the retry."""
    cdef Pending entry
    for waiting in list(upstream.waiting.values()):
        popleft = waiting.popleft
        while waiting:
            entry = <Pending?>waiting[0]
            if not (entry.done or entry.retry_uid >= 0):
                if entry.retry_at > now:
                    break
                upstream.retry(entry, now, counts, outbox)
            popleft()


def serve_upstreams(replies):
    """``Upstream.serve`` for several upstream sockets (their ``Replies``)
    in one thread: receive replies and run the clocks until every one is
    closed."""
    _loop(None, list(replies))


cdef list _loop(_Queries queries, list replies):
    """One thread's sockets in one epoll set: the listening socket of
    ``queries``, if any, and the upstream sockets of ``replies``, each read
    a batch at a time when ready, the upstreams' clocks every ``tick``. One
    thread for several sockets rather than one each: a worker's threads
    take turns at the GIL, and each thread more that a batch wakes is a
    wake-up and a hand-over more. The upstreams' clocks (retries, timeouts,
    ICMP errors) are their own Python methods, counting in
    ``upstream.counts``; the batches count in the counters. Until the
    listening socket is shut down (then: the upstreams still open, for a
    thread of their own) or, without one, until every upstream is closed."""
    cdef double tick = _tick
    cdef Replies each
    cdef Outbox outbox = Outbox()
    cdef epoll_event events[SOURCES + 2]
    cdef int epfd, timer = -1, ready, j, open_ = len(replies)
    cdef bint serving = queries is not None, due, rang
    cdef double now
    cdef unsigned long long expirations
    cdef itimerspec every
    if len(replies) > SOURCES or (replies and tick <= 0):
        raise ValueError("at most 64 upstream sockets for one loop, and a tick for their clocks")
    epfd = epoll_create1(EPOLL_CLOEXEC)
    if epfd < 0:
        raise OSError(errno, "epoll_create1 failed")
    try:
        for j, each in enumerate(replies):
            _watch(epfd, each.receiver.fd, j)
        if serving:
            _watch(epfd, queries.receiver.fd, CLIENT)
        if replies:
            # The clocks' tick from a periodic timer, not from epoll_wait's
            # timeout: that one is a timer armed and cancelled on every
            # wait, twice a query at low rates, and on a virtual machine
            # each is an exit to the host.
            timer = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK)
            if timer < 0:
                raise OSError(errno, "timerfd_create failed")
            every.it_interval.tv_sec = every.it_value.tv_sec = <long>tick
            every.it_interval.tv_nsec = every.it_value.tv_nsec = <long>((tick - <long>tick) * 1e9)
            if timerfd_settime(timer, 0, &every, NULL) < 0:
                raise OSError(errno, "timerfd_settime failed")
            _watch(epfd, timer, TIMER)
        while serving or (queries is None and open_):
            with nogil:
                ready = epoll_wait(epfd, events, SOURCES + 2, -1)
            now = _monotonic()
            rang = False
            for j in range(max(ready, 0)):  # < 0: EINTR, a signal for the main thread
                if events[j].data.u32 == CLIENT:
                    serving = queries.take(outbox)
                    continue
                if events[j].data.u32 == TIMER:
                    read(timer, &expirations, sizeof(expirations))
                    rang = True
                    continue
                each = replies[events[j].data.u32]
                if each.closed:
                    continue
                if events[j].events & EPOLLERR:  # an ICMP error: its queue drained, or epoll says so again at once
                    each.upstream.errors(each.counts, outbox)
                each.take(now, outbox)
            outbox.flush()  # what woke us goes out before the clocks' work, not after it
            for each in replies:
                if each.closed:
                    continue
                due = each.clocks(now, tick, rang, outbox)
                each.got = 0
                # Upstream.close (within a tick): the socket closed by its reader, here
                if due and each.upstream.closing:
                    epoll_ctl(epfd, EPOLL_CTL_DEL, each.receiver.fd, NULL)
                    each.upstream.sock.close()
                    each.closed = True
                    open_ -= 1
            outbox.flush()
    finally:
        if timer >= 0:
            close(timer)
        close(epfd)
    return [each.upstream for each in replies if not each.closed]


cdef int _watch(int epfd, int fd, unsigned int tag) except -1:
    cdef epoll_event event
    event.events = EPOLLIN | EPOLLERR
    event.data.u32 = tag
    if epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &event) < 0:
        raise OSError(errno, "epoll_ctl failed")
    return 0
