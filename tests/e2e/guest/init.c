/* PID 1 of the nested test guest. It proves, on the guest's own virtio-blk disk (/dev/vda):
 *   boot 1: writes a pattern, flushes it (fsync), reads it back, reboots (a device reset),
 *           unless "csi_vduse.reboot=0" is on the command line;
 *   boot 2: reads the pattern back; with "csi_vduse.soak=N", writes and verifies other blocks
 *           for N seconds; marks the disk verified if all went well, flushes, powers off.
 * Results go to the console as "GUEST: ...". */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <time.h>
#include <unistd.h>

#define DISK "/dev/vda"
#define MARK_OFF 0
#define DATA_OFF (1 << 20)
#define DATA_LEN (4 << 20)
#define SOAK_OFF (DATA_OFF + DATA_LEN)
#define CHUNK 65536

static void say(const char *fmt, ...)
{
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    dprintf(1, "GUEST: %s\n", line);
}

static void finish(int how)
{
    sync();
    reboot(how);
    for (;;)
        pause();
}

static unsigned char pattern_byte(long off, unsigned seed)
{
    unsigned x = (unsigned)(off / 8) * 2654435761u ^ seed;
    return (unsigned char)(x >> ((off % 4) * 8));
}

static void fill(unsigned char *buf, long off, size_t len, unsigned seed)
{
    for (size_t i = 0; i < len; i++)
        buf[i] = pattern_byte(off + (long)i, seed);
}

static int write_all(int fd, const void *buf, size_t len, off_t off)
{
    ssize_t n = pwrite(fd, buf, len, off);
    return n == (ssize_t)len ? 0 : -1;
}

static int read_all(int fd, void *buf, size_t len, off_t off)
{
    ssize_t n = pread(fd, buf, len, off);
    return n == (ssize_t)len ? 0 : -1;
}

/* Returns the number of mismatching chunks, or -1 on an I/O error. */
static long verify(int fd, long off, long len, unsigned seed)
{
    static unsigned char got[CHUNK], want[CHUNK];
    long bad = 0;
    for (long pos = 0; pos < len; pos += CHUNK) {
        if (read_all(fd, got, CHUNK, off + pos))
            return -1;
        fill(want, off + pos, CHUNK, seed);
        bad += memcmp(got, want, CHUNK) != 0;
    }
    return bad;
}

static int write_pattern(int fd, long off, long len, unsigned seed)
{
    static unsigned char buf[CHUNK];
    for (long pos = 0; pos < len; pos += CHUNK) {
        fill(buf, off + pos, CHUNK, seed);
        if (write_all(fd, buf, CHUNK, off + pos))
            return -1;
    }
    return fsync(fd);
}

/* The number after "csi_vduse.NAME=" on the kernel command line, or `otherwise`. */
static long cmdline_number(const char *name, long otherwise)
{
    char cmdline[1024] = {0}, key[64];
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd < 0 || read(fd, cmdline, sizeof cmdline - 1) < 0)
        return otherwise;
    close(fd);
    snprintf(key, sizeof key, "csi_vduse.%s=", name);
    char *arg = strstr(cmdline, key);
    return arg ? strtol(arg + strlen(key), NULL, 10) : otherwise;
}

/* Returns the number of I/O errors and mismatches. */
static long soak(int fd, long seconds)
{
    long rounds = 0, errors = 0, mismatches = 0;
    time_t end = time(NULL) + seconds;
    say("soak start");
    while (time(NULL) < end) {
        unsigned seed = 0x5eed0000u + (unsigned)rounds;
        long off = SOAK_OFF + (rounds % 4) * (long)DATA_LEN;
        if (write_pattern(fd, off, DATA_LEN, seed)) {
            errors++;
            say("soak write error: %s", strerror(errno));
        } else {
            posix_fadvise(fd, off, DATA_LEN, POSIX_FADV_DONTNEED);
            long bad = verify(fd, off, DATA_LEN, seed);
            if (bad < 0) {
                errors++;
                say("soak read error: %s", strerror(errno));
            }
            mismatches += bad > 0 ? bad : 0;
        }
        rounds++;
    }
    say("soak done rounds=%ld errors=%ld mismatches=%ld", rounds, errors, mismatches);
    return errors + mismatches;
}

int main(void)
{
    static const char boot1[16] = "CSI-VDUSE-BOOT1", done[16] = "CSI-VDUSE-DONE!";
    char mark[512];
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    mount("proc", "/proc", "proc", 0, NULL);
    int fd = open(DISK, O_RDWR);
    if (fd < 0) {
        say("no disk: %s", strerror(errno));
        finish(RB_POWER_OFF);
    }
    if (read_all(fd, mark, sizeof mark, MARK_OFF)) {
        say("mark read error: %s", strerror(errno));
        finish(RB_POWER_OFF);
    }
    if (memcmp(mark, boot1, sizeof boot1) != 0) {
        if (write_pattern(fd, DATA_OFF, DATA_LEN, 0xc51u)) {
            say("write error: %s", strerror(errno));
            finish(RB_POWER_OFF);
        }
        posix_fadvise(fd, DATA_OFF, DATA_LEN, POSIX_FADV_DONTNEED);
        long bad = verify(fd, DATA_OFF, DATA_LEN, 0xc51u);
        memset(mark, 0, sizeof mark);
        memcpy(mark, boot1, sizeof boot1);
        if (bad != 0 || write_all(fd, mark, sizeof mark, MARK_OFF) || fsync(fd)) {
            say("boot 1 failed: mismatches=%ld %s", bad, strerror(errno));
            finish(RB_POWER_OFF);
        }
        say("wrote and flushed the pattern");
        if (cmdline_number("reboot", 1)) {
            say("rebooting");
            finish(RB_AUTOBOOT);
        }
        posix_fadvise(fd, DATA_OFF, DATA_LEN, POSIX_FADV_DONTNEED);
    }
    long bad = verify(fd, DATA_OFF, DATA_LEN, 0xc51u);
    say("read back mismatches=%ld", bad);
    long seconds = cmdline_number("soak", 0);
    if (bad == 0 && seconds > 0)
        bad = soak(fd, seconds);
    if (bad == 0) {
        memcpy(mark, done, sizeof done);
        if (write_all(fd, mark, sizeof mark, MARK_OFF) || fsync(fd))
            say("done mark failed: %s", strerror(errno));
        else
            say("verified");
    }
    finish(RB_POWER_OFF);
}
