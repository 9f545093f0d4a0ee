/*
 * A minimal virtio-mmio driver for the VMM's virtio-rng at the first device
 * window (0xd0001000): negotiate VERSION_1, set up queue 0 with 8 entries,
 * post one 64-byte buffer, notify, wait for the used ring. The broken
 * variants hand the device a descriptor loop or a buffer outside guest RAM,
 * which the VMM must refuse (DEVICE_NEEDS_RESET) without crashing.
 *
 * Fills: out[0] = bytes the device reported written, out[1] = device status
 * after the request, out[2] = first 8 bytes of the buffer.
 */
typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;

#define VIRTIO 0xd0001000ul
#define REG(off) (*(volatile u32 *)(VIRTIO + (off)))
#define STATUS 0x070
#define STATUS_ACK 1u
#define STATUS_DRIVER 2u
#define STATUS_DRIVER_OK 4u
#define STATUS_FEATURES_OK 8u
#define STATUS_NEEDS_RESET 64u

#define DESC 0x200000ul
#define AVAIL 0x201000ul
#define USED 0x202000ul
#define BUFFER 0x210000ul
#define QUEUE_SIZE 8

enum { VIRTIO_RNG_OK = 0, VIRTIO_RNG_LOOP = 1, VIRTIO_RNG_OUTSIDE_RAM = 2 };

struct desc {
	u64 addr;
	u32 len;
	u16 flags, next;
};

void virtio_rng_request(u64 variant, volatile u64 *out) {
	REG(STATUS) = 0;
	REG(STATUS) = STATUS_ACK | STATUS_DRIVER;
	REG(0x024) = 1; /* DriverFeaturesSel: high word */
	REG(0x020) = 1; /* VIRTIO_F_VERSION_1 (bit 32) */
	REG(STATUS) = STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK;
	REG(0x030) = 0; /* QueueSel */
	REG(0x038) = QUEUE_SIZE;
	REG(0x080) = (u32)DESC, REG(0x084) = 0;
	REG(0x090) = (u32)AVAIL, REG(0x094) = 0;
	REG(0x0a0) = (u32)USED, REG(0x0a4) = 0;
	REG(0x044) = 1; /* QueueReady */
	REG(STATUS) = STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

	volatile struct desc *d = (volatile struct desc *)DESC;
	volatile u16 *avail = (volatile u16 *)AVAIL;
	volatile u16 *used = (volatile u16 *)USED;
	d[0].addr = variant == VIRTIO_RNG_OUTSIDE_RAM ? 0x80000000ul : BUFFER;
	d[0].len = 64;
	d[0].flags = 2 | (variant == VIRTIO_RNG_LOOP ? 1 : 0); /* WRITE (| NEXT) */
	d[0].next = 0;                                        /* a loop onto itself */
	avail[2] = 0;                                         /* ring[0] = descriptor 0 */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	avail[1] = 1; /* idx */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	REG(0x050) = 0; /* QueueNotify: the device works on this vCPU, synchronously */

	out[0] = used[1] == 1 ? *(volatile u32 *)(USED + 4 + 4) : (u64)-1;
	out[1] = REG(STATUS);
	out[2] = *(volatile u64 *)BUFFER;
}
