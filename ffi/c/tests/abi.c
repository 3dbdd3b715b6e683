/* The C ABI against a real cluster: every entry point, good arguments and bad ones (NULL
 * pointers, bad paths, offsets past the end, buffers too small, a wrong token, a dead
 * control plane), the result codes, the messages, and outputs left untouched on failure.
 *
 * Run by ffi/c/tests/c_abi.rs (plainly and under valgrind) with TIER0_CONTROL, TIER0_TOKEN
 * and TIER0_TEST_DIR (a namespace directory of its own, not yet made) set. `abi --smoke`
 * only checks that the library loads (the statically linked build). Exit 0 when every check
 * passed. */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <tier0.h>

static int passed, failed;

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (cond) {                                                                   \
            passed++;                                                                 \
        } else {                                                                      \
            failed++;                                                                 \
            fprintf(stderr, "abi.c:%d: check failed: %s (last error: %s)\n", __LINE__, \
                    #cond, tier0_last_error());                                       \
        }                                                                             \
    } while (0)

/* A call's result is `want`; on failure, the message names the function. */
#define EXPECT(call, want, function)                                                     \
    do {                                                                                 \
        tier0_result got_ = (call);                                                      \
        if (got_ == (want) &&                                                            \
            ((want) == TIER0_OK || strstr(tier0_last_error(), function) != NULL)) {      \
            passed++;                                                                    \
        } else {                                                                         \
            failed++;                                                                    \
            fprintf(stderr, "abi.c:%d: %s gave %d (%s), wanted %d; last error: %s\n",    \
                    __LINE__, #call, got_, tier0_strerror(got_), (want), tier0_last_error()); \
        }                                                                                \
    } while (0)

#define OK(call, function) EXPECT(call, TIER0_OK, function)

static uint8_t pattern(uint64_t i, unsigned seed) {
    return (uint8_t)(i * 31 + seed * 7 + (i >> 9));
}

static uint8_t *make(size_t len, unsigned seed) {
    uint8_t *data = malloc(len ? len : 1);
    for (size_t i = 0; i < len; i++) data[i] = pattern(i, seed);
    return data;
}

static int same(const uint8_t *got, uint64_t file_offset, size_t len, unsigned seed) {
    for (size_t i = 0; i < len; i++)
        if (got[i] != pattern(file_offset + i, seed)) return 0;
    return 1;
}

static int all(const uint8_t *bytes, size_t len, uint8_t value) {
    for (size_t i = 0; i < len; i++)
        if (bytes[i] != value) return 0;
    return 1;
}

static char *join(const char *dir, const char *name) {
    size_t len = strlen(dir) + strlen(name) + 2;
    char *path = malloc(len);
    snprintf(path, len, "%s/%s", dir, name);
    return path;
}

/* Sizes: a file of several chunks (the test cluster's chunks are 64 KiB) with a short last
 * one, a small one, an empty one. */
#define BIG_SIZE (5 * 65536 + 1234)
#define SMALL_SIZE 100

static void connecting(const char *control, const char *token) {
    tier0_client *const sentinel = (tier0_client *)(uintptr_t)0x5eed;
    tier0_client *client = sentinel;
    EXPECT(tier0_client_new(NULL, token, &client), TIER0_INVALID_ARGUMENT, "tier0_client_new");
    CHECK(strstr(tier0_last_error(), "control_url is NULL") != NULL);
    EXPECT(tier0_client_new(control, NULL, &client), TIER0_INVALID_ARGUMENT, "tier0_client_new");
    EXPECT(tier0_client_new(control, token, NULL), TIER0_INVALID_ARGUMENT, "tier0_client_new");
    EXPECT(tier0_client_new(control, "", &client), TIER0_INVALID_ARGUMENT, "tier0_client_new");
    EXPECT(tier0_client_new(control, "not-the-token", &client), TIER0_UNAUTHENTICATED,
           "tier0_client_new");
    CHECK(strstr(tier0_last_error(), "token") != NULL);
    /* Nothing listens on port 1 of loopback. */
    EXPECT(tier0_client_new("http://127.0.0.1:1", token, &client), TIER0_UNAVAILABLE,
           "tier0_client_new");
    CHECK(strstr(tier0_last_error(), "127.0.0.1:1") != NULL);
    EXPECT(tier0_client_new("http://bad host:7300", token, &client), TIER0_INVALID_ARGUMENT,
           "tier0_client_new");
    CHECK(client == sentinel);
}

static void namespace_calls(tier0_client *client, const char *dir) {
    char *sub = join(dir, "sub");
    char *deep = join(dir, "a/b/c");
    char *missing = join(dir, "missing/x");
    OK(tier0_mkdir(client, dir, false), "tier0_mkdir");
    EXPECT(tier0_mkdir(client, dir, false), TIER0_ALREADY_EXISTS, "tier0_mkdir");
    CHECK(strstr(tier0_last_error(), dir) != NULL);
    OK(tier0_mkdir(client, dir, true), "tier0_mkdir");
    OK(tier0_mkdir(client, sub, false), "tier0_mkdir");
    EXPECT(tier0_mkdir(client, deep, false), TIER0_NOT_FOUND, "tier0_mkdir");
    OK(tier0_mkdir(client, deep, true), "tier0_mkdir");
    EXPECT(tier0_mkdir(client, "relative/path", true), TIER0_INVALID_ARGUMENT, "tier0_mkdir");
    EXPECT(tier0_mkdir(NULL, dir, true), TIER0_INVALID_ARGUMENT, "tier0_mkdir");
    EXPECT(tier0_mkdir(client, NULL, true), TIER0_INVALID_ARGUMENT, "tier0_mkdir");

    tier0_info stat, untouched;
    memset(&stat, 0xab, sizeof stat);
    memcpy(&untouched, &stat, sizeof stat);
    EXPECT(tier0_stat(client, missing, &stat), TIER0_NOT_FOUND, "tier0_stat");
    CHECK(memcmp(&stat, &untouched, sizeof stat) == 0);
    EXPECT(tier0_stat(client, dir, NULL), TIER0_INVALID_ARGUMENT, "tier0_stat");
    EXPECT(tier0_stat(NULL, dir, &stat), TIER0_INVALID_ARGUMENT, "tier0_stat");
    OK(tier0_stat(client, sub, &stat), "tier0_stat");
    CHECK(stat.kind == TIER0_KIND_DIRECTORY);
    CHECK(stat.size == 0);
    CHECK(strcmp(tier0_last_error(), "") == 0);
    free(sub);
    free(deep);
    free(missing);
}

static void writes(tier0_client *client, const char *dir) {
    char *big = join(dir, "big.bin");
    char *small = join(dir, "small.bin");
    char *empty = join(dir, "empty.bin");
    char *orphan = join(dir, "no-such-dir/file");
    uint8_t *big_data = make(BIG_SIZE, 1);
    uint8_t *small_data = make(SMALL_SIZE, 2);
    OK(tier0_write_file(client, big, big_data, BIG_SIZE), "tier0_write_file");
    OK(tier0_write_file(client, small, small_data, SMALL_SIZE), "tier0_write_file");
    OK(tier0_write_file(client, empty, NULL, 0), "tier0_write_file");
    EXPECT(tier0_write_file(client, orphan, small_data, SMALL_SIZE), TIER0_NOT_FOUND,
           "tier0_write_file");
    EXPECT(tier0_write_file(client, small, NULL, 5), TIER0_INVALID_ARGUMENT, "tier0_write_file");
    EXPECT(tier0_write_file(client, NULL, small_data, 5), TIER0_INVALID_ARGUMENT,
           "tier0_write_file");
    EXPECT(tier0_write_file(NULL, small, small_data, 5), TIER0_INVALID_ARGUMENT,
           "tier0_write_file");
    /* The control plane calls a directory in the way "already exists". */
    EXPECT(tier0_write_file(client, dir, small_data, 5), TIER0_ALREADY_EXISTS,
           "tier0_write_file");
    /* Nothing of the failed writes is there. */
    tier0_info stat;
    EXPECT(tier0_stat(client, orphan, &stat), TIER0_NOT_FOUND, "tier0_stat");
    OK(tier0_stat(client, small, &stat), "tier0_stat");
    CHECK(stat.kind == TIER0_KIND_FILE && stat.size == SMALL_SIZE && stat.version >= 1);
    OK(tier0_stat(client, big, &stat), "tier0_stat");
    CHECK(stat.size == BIG_SIZE && stat.chunk_size == 65536);
    uint64_t size = 7;
    OK(tier0_file_size(client, empty, &size), "tier0_file_size");
    CHECK(size == 0);
    size = 7;
    EXPECT(tier0_file_size(client, orphan, &size), TIER0_NOT_FOUND, "tier0_file_size");
    CHECK(size == 7);
    EXPECT(tier0_file_size(client, big, NULL), TIER0_INVALID_ARGUMENT, "tier0_file_size");
    free(big_data);
    free(small_data);
    free(big);
    free(small);
    free(empty);
    free(orphan);
}

/* A streaming writer: pieces of odd sizes across chunk boundaries, committed at close;
 * nothing visible before; a writer freed without closing commits nothing; bad arguments. */
static void streaming(tier0_client *client, const char *dir) {
    char *path = join(dir, "streamed.bin");
    char *orphan = join(dir, "no-such-dir/streamed");
    size_t len = 200000;
    uint8_t *data = make(len, 9);
    tier0_writer *writer = NULL;
    OK(tier0_writer_new(client, path, &writer), "tier0_writer_new");
    for (size_t at = 0; at < len;) {
        size_t piece = len - at < 7777 ? len - at : 7777;
        OK(tier0_writer_write(writer, data + at, piece), "tier0_writer_write");
        at += piece;
    }
    tier0_info stat;
    OK(tier0_stat(client, path, &stat), "tier0_stat");
    CHECK(stat.size == 0 && stat.version == 0); /* nothing before the close */
    uint64_t size = 0;
    OK(tier0_writer_close(writer, &size), "tier0_writer_close");
    CHECK(size == len);
    EXPECT(tier0_writer_close(writer, NULL), TIER0_INVALID_ARGUMENT, "tier0_writer_close");
    EXPECT(tier0_writer_write(writer, data, 1), TIER0_INVALID_ARGUMENT, "tier0_writer_write");
    tier0_writer_free(writer);
    uint8_t *back = malloc(len);
    size_t got = 0;
    OK(tier0_read_file(client, path, back, len, &got), "tier0_read_file");
    CHECK(got == len && memcmp(back, data, len) == 0);
    /* Freed without a close: the file keeps the committed version. */
    OK(tier0_writer_new(client, path, &writer), "tier0_writer_new");
    OK(tier0_writer_write(writer, data, 1000), "tier0_writer_write");
    tier0_writer_free(writer);
    OK(tier0_stat(client, path, &stat), "tier0_stat");
    CHECK(stat.size == len);
    writer = (tier0_writer *)0x1;
    EXPECT(tier0_writer_new(client, orphan, &writer), TIER0_NOT_FOUND, "tier0_writer_new");
    CHECK(writer == (tier0_writer *)0x1); /* untouched on failure */
    EXPECT(tier0_writer_new(client, path, NULL), TIER0_INVALID_ARGUMENT, "tier0_writer_new");
    EXPECT(tier0_writer_write(NULL, data, 1), TIER0_INVALID_ARGUMENT, "tier0_writer_write");
    tier0_writer_free(NULL);
    free(back);
    free(data);
    free(path);
    free(orphan);
}

static void copy_reads(tier0_client *client, const char *dir) {
    char *big = join(dir, "big.bin");
    char *small = join(dir, "small.bin");
    char *empty = join(dir, "empty.bin");
    char *missing = join(dir, "missing.bin");
    size_t got = 0;
    uint8_t *dst = malloc(BIG_SIZE + 10);

    OK(tier0_read_file(client, big, dst, BIG_SIZE + 10, &got), "tier0_read_file");
    CHECK(got == BIG_SIZE && same(dst, 0, BIG_SIZE, 1));
    OK(tier0_read_file(client, empty, dst, 0, &got), "tier0_read_file");
    CHECK(got == 0);
    memset(dst, 0xee, BIG_SIZE + 10);
    got = 12345;
    EXPECT(tier0_read_file(client, big, dst, BIG_SIZE - 1, &got), TIER0_BUFFER_TOO_SMALL,
           "tier0_read_file");
    CHECK(strstr(tier0_last_error(), "holds 328914 bytes") != NULL);
    CHECK(got == 12345 && all(dst, BIG_SIZE + 10, 0xee));
    EXPECT(tier0_read_file(client, missing, dst, BIG_SIZE, &got), TIER0_NOT_FOUND,
           "tier0_read_file");
    CHECK(strstr(tier0_last_error(), missing) != NULL);
    CHECK(got == 12345 && all(dst, BIG_SIZE + 10, 0xee));
    EXPECT(tier0_read_file(client, dir, dst, BIG_SIZE, &got), TIER0_CONFLICT, "tier0_read_file");
    EXPECT(tier0_read_file(client, big, NULL, BIG_SIZE, &got), TIER0_INVALID_ARGUMENT,
           "tier0_read_file");
    EXPECT(tier0_read_file(client, big, dst, BIG_SIZE, NULL), TIER0_INVALID_ARGUMENT,
           "tier0_read_file");
    EXPECT(tier0_read_file(client, "", dst, BIG_SIZE, &got), TIER0_INVALID_ARGUMENT,
           "tier0_read_file");
    /* A path that is not UTF-8. */
    EXPECT(tier0_read_file(client, "/\xff\xfe", dst, BIG_SIZE, &got), TIER0_INVALID_ARGUMENT,
           "tier0_read_file");
    CHECK(strstr(tier0_last_error(), "not UTF-8") != NULL);
    CHECK(got == 12345);

    /* Ranges: across chunk boundaries, up to the end, at the end, past it. */
    OK(tier0_read_range(client, big, 65536 - 100, dst, 200000, &got), "tier0_read_range");
    CHECK(got == 200000 && same(dst, 65536 - 100, 200000, 1));
    OK(tier0_read_range(client, big, BIG_SIZE - 10, dst, 1000, &got), "tier0_read_range");
    CHECK(got == 10 && same(dst, BIG_SIZE - 10, 10, 1));
    OK(tier0_read_range(client, small, SMALL_SIZE, dst, 1000, &got), "tier0_read_range");
    CHECK(got == 0);
    memset(dst, 0xee, 100);
    got = 12345;
    EXPECT(tier0_read_range(client, small, SMALL_SIZE + 1, dst, 10, &got),
           TIER0_INVALID_ARGUMENT, "tier0_read_range");
    CHECK(strstr(tier0_last_error(), "past the end") != NULL);
    CHECK(got == 12345 && all(dst, 100, 0xee));
    EXPECT(tier0_read_range(client, missing, 0, dst, 10, &got), TIER0_NOT_FOUND,
           "tier0_read_range");
    EXPECT(tier0_read_range(client, small, 0, NULL, 10, &got), TIER0_INVALID_ARGUMENT,
           "tier0_read_range");
    CHECK(got == 12345);
    free(dst);
    free(big);
    free(small);
    free(empty);
    free(missing);
}

static void listing(tier0_client *client, const char *dir) {
    tier0_listing *const sentinel = (tier0_listing *)(uintptr_t)0x5eed;
    tier0_listing *list = sentinel;
    char *missing = join(dir, "missing");
    EXPECT(tier0_list(client, missing, &list), TIER0_NOT_FOUND, "tier0_list");
    EXPECT(tier0_list(client, dir, NULL), TIER0_INVALID_ARGUMENT, "tier0_list");
    CHECK(list == sentinel);
    OK(tier0_list(client, dir, &list), "tier0_list");
    /* a, big.bin, empty.bin, small.bin, sub */
    CHECK(tier0_listing_len(list) == 5);
    int files = 0, dirs = 0, big_seen = 0;
    for (size_t i = 0; i < tier0_listing_len(list); i++) {
        tier0_entry entry;
        OK(tier0_listing_get(list, i, &entry), "tier0_listing_get");
        if (entry.stat.kind == TIER0_KIND_FILE) files++;
        if (entry.stat.kind == TIER0_KIND_DIRECTORY) dirs++;
        if (strcmp(entry.name, "big.bin") == 0 && entry.stat.size == BIG_SIZE) big_seen = 1;
    }
    CHECK(files == 3 && dirs == 2 && big_seen);
    tier0_entry entry;
    memset(&entry, 0xab, sizeof entry);
    EXPECT(tier0_listing_get(list, 5, &entry), TIER0_INVALID_ARGUMENT, "tier0_listing_get");
    CHECK(entry.stat.size == 0xabababababababab);
    EXPECT(tier0_listing_get(NULL, 0, &entry), TIER0_INVALID_ARGUMENT, "tier0_listing_get");
    EXPECT(tier0_listing_get(list, 0, NULL), TIER0_INVALID_ARGUMENT, "tier0_listing_get");
    CHECK(tier0_listing_len(NULL) == 0);
    tier0_listing_free(list);
    free(missing);
}

static void buffers(void) {
    tier0_buffer *const sentinel = (tier0_buffer *)(uintptr_t)0x5eed;
    tier0_buffer *buf = sentinel;
    EXPECT(tier0_buffer_new(0, -1, &buf), TIER0_INVALID_ARGUMENT, "tier0_buffer_new");
    EXPECT(tier0_buffer_new(4096, -2, &buf), TIER0_INVALID_ARGUMENT, "tier0_buffer_new");
    EXPECT(tier0_buffer_new(4096, 4000, &buf), TIER0_INVALID_ARGUMENT, "tier0_buffer_new");
    CHECK(strstr(tier0_last_error(), "NUMA node 4000") != NULL);
    EXPECT(tier0_buffer_new(4096, -1, NULL), TIER0_INVALID_ARGUMENT, "tier0_buffer_new");
    CHECK(buf == sentinel);
    /* Node 0 exists on every Linux machine. */
    OK(tier0_buffer_new(10000, 0, &buf), "tier0_buffer_new");
    CHECK(tier0_buffer_len(buf) == 10000);
    uint8_t *data = tier0_buffer_data(buf);
    CHECK(data != NULL && ((uintptr_t)data % 4096) == 0 && all(data, 10000, 0));
    memset(data, 1, 10000);
    tier0_buffer_free(buf);
    CHECK(tier0_buffer_data(NULL) == NULL && tier0_buffer_len(NULL) == 0);
}

static tier0_completion *find(tier0_completion *completions, unsigned count, uint64_t tag) {
    for (unsigned i = 0; i < count; i++)
        if (completions[i].user_data == tag) return &completions[i];
    return NULL;
}

static void rings(tier0_client *client, const char *dir) {
    char *big = join(dir, "big.bin");
    char *small = join(dir, "small.bin");
    char *missing = join(dir, "missing.bin");
    tier0_buffer *buf = NULL;
    size_t buf_len = 2 * BIG_SIZE;
    OK(tier0_buffer_new(buf_len, -1, &buf), "tier0_buffer_new");
    uint8_t *data = tier0_buffer_data(buf);

    tier0_ring *const sentinel = (tier0_ring *)(uintptr_t)0x5eed;
    tier0_ring *ring = sentinel;
    EXPECT(tier0_ring_new(NULL, buf, 8, &ring), TIER0_INVALID_ARGUMENT, "tier0_ring_new");
    EXPECT(tier0_ring_new(client, NULL, 8, &ring), TIER0_INVALID_ARGUMENT, "tier0_ring_new");
    EXPECT(tier0_ring_new(client, buf, 0, &ring), TIER0_INVALID_ARGUMENT, "tier0_ring_new");
    EXPECT(tier0_ring_new(client, buf, 8, NULL), TIER0_INVALID_ARGUMENT, "tier0_ring_new");
    CHECK(ring == sentinel);
    OK(tier0_ring_new(client, buf, 8, &ring), "tier0_ring_new");

    /* Bad preps are refused and take no room. */
    EXPECT(tier0_ring_prep_read(NULL, big, 0, 10, 0, 1), TIER0_INVALID_ARGUMENT,
           "tier0_ring_prep_read");
    EXPECT(tier0_ring_prep_read(ring, NULL, 0, 10, 0, 1), TIER0_INVALID_ARGUMENT,
           "tier0_ring_prep_read");
    EXPECT(tier0_ring_prep_read(ring, big, 0, 10, buf_len - 5, 1), TIER0_BUFFER_TOO_SMALL,
           "tier0_ring_prep_read");
    EXPECT(tier0_ring_prep_read(ring, big, 0, UINT64_MAX, 0, 1), TIER0_BUFFER_TOO_SMALL,
           "tier0_ring_prep_read");

    /* One batch: a whole file, pieces of another across chunk boundaries into scattered
     * places, a read clipped at the end, one at the end, one past it, a missing file. */
    OK(tier0_ring_prep_read(ring, big, 0, BIG_SIZE, 0, 100), "tier0_ring_prep_read");
    OK(tier0_ring_prep_read(ring, small, 10, 50, BIG_SIZE + 7, 101), "tier0_ring_prep_read");
    EXPECT(tier0_ring_prep_read(ring, small, 0, 10, BIG_SIZE - 3, 1), TIER0_INVALID_ARGUMENT,
           "tier0_ring_prep_read");
    CHECK(strstr(tier0_last_error(), "overlaps") != NULL);
    OK(tier0_ring_prep_read(ring, big, 65530, 70000, BIG_SIZE + 100, 102), "tier0_ring_prep_read");
    OK(tier0_ring_prep_read(ring, small, 90, 1000, BIG_SIZE + 80000, 103), "tier0_ring_prep_read");
    OK(tier0_ring_prep_read(ring, small, SMALL_SIZE, 10, BIG_SIZE + 90000, 104),
       "tier0_ring_prep_read");
    OK(tier0_ring_prep_read(ring, small, SMALL_SIZE + 1, 10, BIG_SIZE + 91000, 105),
       "tier0_ring_prep_read");
    OK(tier0_ring_prep_read(ring, missing, 0, 10, BIG_SIZE + 92000, 106), "tier0_ring_prep_read");
    OK(tier0_ring_prep_read(ring, small, 0, 1, BIG_SIZE + 93000, 107), "tier0_ring_prep_read");
    EXPECT(tier0_ring_prep_read(ring, small, 0, 1, BIG_SIZE + 94000, 108), TIER0_RING_FULL,
           "tier0_ring_prep_read");

    tier0_completion completions[16];
    unsigned count = 99;
    /* Nothing submitted: waiting for one would never end. */
    EXPECT(tier0_ring_wait(ring, completions, 16, 1, &count), TIER0_INVALID_ARGUMENT,
           "tier0_ring_wait");
    CHECK(count == 99);
    OK(tier0_ring_wait(ring, completions, 16, 0, &count), "tier0_ring_wait");
    CHECK(count == 0);
    EXPECT(tier0_ring_submit(NULL), TIER0_INVALID_ARGUMENT, "tier0_ring_submit");
    OK(tier0_ring_submit(ring), "tier0_ring_submit");
    OK(tier0_ring_submit(ring), "tier0_ring_submit"); /* nothing prepared: nothing to do */
    count = 99;
    EXPECT(tier0_ring_wait(ring, completions, 4, 5, &count), TIER0_INVALID_ARGUMENT,
           "tier0_ring_wait");
    EXPECT(tier0_ring_wait(ring, completions, 16, 9, &count), TIER0_INVALID_ARGUMENT,
           "tier0_ring_wait");
    EXPECT(tier0_ring_wait(ring, NULL, 16, 1, &count), TIER0_INVALID_ARGUMENT, "tier0_ring_wait");
    EXPECT(tier0_ring_wait(ring, completions, 16, 1, NULL), TIER0_INVALID_ARGUMENT,
           "tier0_ring_wait");
    EXPECT(tier0_ring_wait(NULL, completions, 16, 1, &count), TIER0_INVALID_ARGUMENT,
           "tier0_ring_wait");
    CHECK(count == 99);
    /* Reap in two goes: 3, then the other 5. */
    unsigned reaped = 0;
    OK(tier0_ring_wait(ring, completions, 3, 3, &count), "tier0_ring_wait");
    CHECK(count == 3);
    reaped += count;
    OK(tier0_ring_wait(ring, completions + reaped, 16, 8 - reaped, &count), "tier0_ring_wait");
    reaped += count;
    CHECK(reaped == 8);
    /* The last failed read of that wait says why. */
    CHECK(strstr(tier0_last_error(), "tier0_ring_wait") != NULL);
    /* Each failed read has its own message: 105 (past the end) is not 106 (missing). */
    {
        char text[512];
        size_t text_len = 0;
        OK(tier0_ring_error(ring, 105, text, sizeof text, &text_len), "tier0_ring_error");
        CHECK(strstr(text, "past the end") != NULL && strstr(text, "missing") == NULL);
        CHECK(text_len == strlen(text));
        OK(tier0_ring_error(ring, 106, text, sizeof text, NULL), "tier0_ring_error");
        CHECK(strstr(text, missing) != NULL && strstr(text, "past the end") == NULL);
        OK(tier0_ring_error(ring, 106, NULL, 0, &text_len), "tier0_ring_error");
        CHECK(text_len > 0);
        EXPECT(tier0_ring_error(ring, 100, text, sizeof text, &text_len), TIER0_NOT_FOUND,
               "tier0_ring_error");
    }

    tier0_completion *c;
    CHECK((c = find(completions, reaped, 100)) && c->result == TIER0_OK && c->bytes == BIG_SIZE);
    CHECK(same(data, 0, BIG_SIZE, 1));
    CHECK((c = find(completions, reaped, 101)) && c->result == TIER0_OK && c->bytes == 50);
    CHECK(same(data + BIG_SIZE + 7, 10, 50, 2));
    CHECK((c = find(completions, reaped, 102)) && c->result == TIER0_OK && c->bytes == 70000);
    CHECK(same(data + BIG_SIZE + 100, 65530, 70000, 1));
    CHECK((c = find(completions, reaped, 103)) && c->result == TIER0_OK && c->bytes == 10);
    CHECK(same(data + BIG_SIZE + 80000, 90, 10, 2));
    CHECK(all(data + BIG_SIZE + 80010, 100, 0));
    CHECK((c = find(completions, reaped, 104)) && c->result == TIER0_OK && c->bytes == 0);
    CHECK((c = find(completions, reaped, 105)) && c->result == TIER0_INVALID_ARGUMENT &&
          c->bytes == 0);
    CHECK((c = find(completions, reaped, 106)) && c->result == TIER0_NOT_FOUND && c->bytes == 0);
    CHECK(all(data + BIG_SIZE + 92000, 10, 0));
    CHECK((c = find(completions, reaped, 107)) && c->result == TIER0_OK && c->bytes == 1);

    /* The ring is empty again; a second batch of many small reads, with the client freed
     * first (the ring keeps what it needs). */
    tier0_client_free(client);
    memset(data, 0, buf_len);
    for (uint64_t i = 0; i < 8; i++)
        OK(tier0_ring_prep_read(ring, big, i * 40000, 4096, i * 8192, 200 + i),
           "tier0_ring_prep_read");
    OK(tier0_ring_submit(ring), "tier0_ring_submit");
    OK(tier0_ring_wait(ring, completions, 16, 8, &count), "tier0_ring_wait");
    CHECK(count == 8);
    CHECK(strcmp(tier0_last_error(), "") == 0);
    for (uint64_t i = 0; i < 8; i++) {
        CHECK((c = find(completions, count, 200 + i)) && c->result == TIER0_OK &&
              c->bytes == 4096);
        CHECK(same(data + i * 8192, i * 40000, 4096, 1));
    }
    /* Freed with a batch in flight: the free waits for it. */
    OK(tier0_ring_prep_read(ring, big, 0, BIG_SIZE, 0, 300), "tier0_ring_prep_read");
    OK(tier0_ring_submit(ring), "tier0_ring_submit");
    tier0_buffer_free(buf);
    tier0_ring_free(ring);
    free(big);
    free(small);
    free(missing);
}

/* An open file is pinned to its version: another client commits a new version, of another
 * size, between two reads of the handle; both reads, and the size, are the opened version's. */
static void open_files(tier0_client *client, tier0_client *writer, const char *dir) {
    char *path = join(dir, "pinned.bin");
    char *missing = join(dir, "missing.bin");
    const size_t old_size = 3 * 65536 + 999, new_size = 65536 + 5;
    uint8_t *old_data = make(old_size, 7);
    uint8_t *new_data = make(new_size, 8);
    uint8_t *dst = malloc(old_size + 10);
    size_t got = 0;
    OK(tier0_write_file(client, path, old_data, old_size), "tier0_write_file");

    tier0_file *const sentinel = (tier0_file *)(uintptr_t)0x5eed;
    tier0_file *file = sentinel;
    EXPECT(tier0_file_open(NULL, path, &file), TIER0_INVALID_ARGUMENT, "tier0_file_open");
    EXPECT(tier0_file_open(client, NULL, &file), TIER0_INVALID_ARGUMENT, "tier0_file_open");
    EXPECT(tier0_file_open(client, path, NULL), TIER0_INVALID_ARGUMENT, "tier0_file_open");
    EXPECT(tier0_file_open(client, missing, &file), TIER0_NOT_FOUND, "tier0_file_open");
    CHECK(file == sentinel);
    OK(tier0_file_open(client, path, &file), "tier0_file_open");
    tier0_file_version opened = {0};
    OK(tier0_file_info(file, &opened), "tier0_file_info");
    CHECK(opened.size == old_size && opened.version >= 1 && opened.id != 0);
    EXPECT(tier0_file_info(NULL, &opened), TIER0_INVALID_ARGUMENT, "tier0_file_info");
    EXPECT(tier0_file_info(file, NULL), TIER0_INVALID_ARGUMENT, "tier0_file_info");

    size_t head = 65536 + 77;
    OK(tier0_file_read_at(file, 0, dst, head, &got), "tier0_file_read_at");
    CHECK(got == head);
    /* Another client commits a new, shorter version. */
    OK(tier0_write_file(writer, path, new_data, new_size), "tier0_write_file");
    tier0_info now;
    OK(tier0_stat(writer, path, &now), "tier0_stat");
    CHECK(now.size == new_size && now.version > opened.version);
    OK(tier0_file_read_at(file, head, dst + head, old_size + 10 - head, &got),
       "tier0_file_read_at");
    CHECK(got == old_size - head);
    CHECK(memcmp(dst, old_data, old_size) == 0);
    tier0_file_version after = {0};
    OK(tier0_file_info(file, &after), "tier0_file_info");
    CHECK(after.size == old_size && after.version == opened.version && after.id == opened.id);
    /* At the end, past it, bad arguments. */
    OK(tier0_file_read_at(file, old_size, dst, 10, &got), "tier0_file_read_at");
    CHECK(got == 0);
    got = 12345;
    EXPECT(tier0_file_read_at(file, old_size + 1, dst, 10, &got), TIER0_INVALID_ARGUMENT,
           "tier0_file_read_at");
    CHECK(strstr(tier0_last_error(), "past the end") != NULL);
    EXPECT(tier0_file_read_at(file, 0, NULL, 10, &got), TIER0_INVALID_ARGUMENT,
           "tier0_file_read_at");
    EXPECT(tier0_file_read_at(file, 0, dst, 10, NULL), TIER0_INVALID_ARGUMENT,
           "tier0_file_read_at");
    EXPECT(tier0_file_read_at(NULL, 0, dst, 10, &got), TIER0_INVALID_ARGUMENT,
           "tier0_file_read_at");
    CHECK(got == 12345);
    tier0_file_close(file);

    /* Opened again: the new version. */
    OK(tier0_file_open(client, path, &file), "tier0_file_open");
    OK(tier0_file_read_at(file, 0, dst, old_size, &got), "tier0_file_read_at");
    CHECK(got == new_size && memcmp(dst, new_data, new_size) == 0);
    tier0_file_close(file);
    CHECK(strcmp(tier0_strerror(TIER0_STALE), "the open file's version is no longer readable") == 0);
    free(old_data);
    free(new_data);
    free(dst);
    free(path);
    free(missing);
}

static void removing(tier0_client *client, const char *dir) {
    uint64_t removed = 0;
    char *small = join(dir, "small.bin");
    EXPECT(tier0_remove(client, dir, false, &removed), TIER0_CONFLICT, "tier0_remove");
    CHECK(removed == 0);
    OK(tier0_remove(client, small, false, NULL), "tier0_remove");
    tier0_info stat;
    EXPECT(tier0_stat(client, small, &stat), TIER0_NOT_FOUND, "tier0_stat");
    EXPECT(tier0_remove(client, small, false, &removed), TIER0_NOT_FOUND, "tier0_remove");
    EXPECT(tier0_remove(NULL, dir, true, &removed), TIER0_INVALID_ARGUMENT, "tier0_remove");
    OK(tier0_remove(client, dir, true, &removed), "tier0_remove");
    CHECK(removed >= 6);
    EXPECT(tier0_stat(client, dir, &stat), TIER0_NOT_FOUND, "tier0_stat");
    free(small);
}

int main(int argc, char **argv) {
    CHECK(tier0_version() != NULL && strlen(tier0_version()) > 0);
    CHECK(strcmp(tier0_strerror(TIER0_OK), "OK") == 0);
    CHECK(strcmp(tier0_strerror(-7), "unknown tier0_result") == 0);
    /* Freeing NULL is nothing. */
    tier0_client_free(NULL);
    tier0_buffer_free(NULL);
    tier0_ring_free(NULL);
    tier0_listing_free(NULL);
    tier0_file_close(NULL);
    if (argc > 1 && strcmp(argv[1], "--smoke") == 0) {
        tier0_buffer *buf = NULL;
        OK(tier0_buffer_new(4096, -1, &buf), "tier0_buffer_new");
        tier0_buffer_free(buf);
        printf("abi --smoke: %d passed, %d failed\n", passed, failed);
        return failed ? 1 : 0;
    }
    const char *control = getenv("TIER0_CONTROL");
    const char *token = getenv("TIER0_TOKEN");
    const char *dir = getenv("TIER0_TEST_DIR");
    if (!control || !token || !dir) {
        fprintf(stderr, "abi: set TIER0_CONTROL, TIER0_TOKEN and TIER0_TEST_DIR\n");
        return 2;
    }
    connecting(control, token);
    buffers();
    tier0_client *client = NULL;
    OK(tier0_client_new(control, token, &client), "tier0_client_new");
    if (!client) {
        fprintf(stderr, "abi: no client, stopping\n");
        return 1;
    }
    namespace_calls(client, dir);
    writes(client, dir);
    copy_reads(client, dir);
    listing(client, dir);
    streaming(client, dir);
    tier0_client *second = NULL;
    OK(tier0_client_new(control, token, &second), "tier0_client_new");
    open_files(client, second, dir);
    rings(second, dir); /* frees `second` */
    removing(client, dir);
    tier0_client_free(client);
    printf("abi: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
