// The cellvm agent protocol on the wire. docs/PROTOCOL.md is the reference;
// sdk/cellvm/protocol.py mirrors these numbers. Change both or neither.
#ifndef CELLVM_AGENT_PROTO_H
#define CELLVM_AGENT_PROTO_H

#include <stdint.h>

#define PROTO_VERSION 1

// Frame header, little endian: u32 payload length, u32 stream id, u16 type,
// u16 flags. The payload follows.
#define FRAME_HEADER_SIZE 12
#define FRAME_MAX_PAYLOAD (1u << 20)

// Data frames carry at most this much; every data channel starts with a
// window of STREAM_WINDOW bytes that the receiver tops up with CREDIT.
#define DATA_CHUNK_MAX (64u << 10)
#define STREAM_WINDOW (256u << 10)

enum frame_flag {
	FLAG_EOF = 1u << 0,  // data frame: the last one of its channel
	FLAG_MORE = 1u << 1, // RESULT: more RESULT frames of this request follow
};
#define FLAG_KNOWN (FLAG_EOF | FLAG_MORE)

enum msg_type {
	// host -> agent requests; the frame id names the request
	MSG_HELLO = 1,
	MSG_EXEC = 2,
	MSG_SIGNAL = 3,	  // on an exec's id, no reply
	MSG_RESIZE = 4,	  // on an exec's id, no reply
	MSG_RESTORED = 5,
	MSG_CANCEL = 6,	  // on a file stream's id, no reply
	MSG_FILE_READ = 16,
	MSG_FILE_WRITE = 17,
	MSG_LIST = 18,
	MSG_STAT = 19,
	MSG_MKDIR = 20,
	MSG_REMOVE = 21,

	// data and flow control
	MSG_STDIN = 32,	    // host -> agent
	MSG_STDOUT = 33,    // agent -> host
	MSG_STDERR = 34,    // agent -> host
	MSG_FILE_DATA = 35, // either way: FILE_READ agent->host, FILE_WRITE host->agent
	MSG_CREDIT = 36,    // payload: u16 data type, u16 zero, u32 bytes

	// agent -> host
	MSG_READY = 64,	 // id 0, sent once when the agent starts serving
	MSG_RESULT = 65, // success reply to a request
	MSG_ERROR = 66,	 // failure reply to a request (or id 0: connection level)
	MSG_STARTED = 67,
	MSG_EXIT = 68,
};

// Control payloads are a list of fields: u16 tag, u32 length, value. Integers
// are 8-byte little-endian signed; strings are raw bytes without a NUL; a tag
// may repeat (argv, env, entries). Unknown tags are ignored.
#define FIELD_HEADER_SIZE 6

enum field_tag {
	F_VERSION = 1,
	F_AGENT = 2,
	F_PID = 3,
	F_INIT = 4,
	F_WINDOW = 5,
	F_MAX_PAYLOAD = 6,

	F_ARGV = 16,
	F_ENV = 17,
	F_CWD = 18,
	F_USER = 19,
	F_UID = 20,
	F_GID = 21,
	F_STDIN = 22,
	F_PTY = 23,
	F_ROWS = 24,
	F_COLS = 25,
	F_TIMEOUT_MS = 26,
	F_CLEAR_ENV = 27,

	F_EXIT_CODE = 32,
	F_SIGNAL = 33,
	F_TIMED_OUT = 34,
	F_CORE_DUMPED = 35,

	F_CODE = 40,
	F_ERRNO = 41,
	F_MESSAGE = 42,

	F_PATH = 48,
	F_MODE = 49,
	F_SIZE = 50,
	F_TYPE = 51,
	F_MTIME_NS = 52,
	F_NAME = 53,
	F_ENTRY = 54,
	F_TARGET = 55,
	F_PARENTS = 56,
	F_RECURSIVE = 57,
	F_FOLLOW = 58,
	F_OFFSET = 59,
	F_LENGTH = 60,
	F_APPEND = 61,

	F_ENTROPY = 64,
	F_TIME_NS = 65,
	F_ENTROPY_ADDED = 66,
	F_RESEEDED = 67,
	F_CLOCK_STEPPED = 68,
	F_CLOCK_OFFSET_NS = 69,
};

enum error_code {
	E_PROTOCOL = 1,		 // malformed frame or fields, unknown type
	E_COMMAND_NOT_FOUND = 2, // argv[0] not found (in PATH)
	E_PERMISSION = 3,	 // EACCES / EPERM
	E_BAD_CWD = 4,		 // the working directory cannot be entered
	E_NOT_FOUND = 5,	 // a path does not exist
	E_EXISTS = 6,
	E_NOT_A_DIRECTORY = 7,
	E_IS_A_DIRECTORY = 8,
	E_NOT_EMPTY = 9,
	E_INVALID = 10,		 // well-formed but unacceptable request
	E_IO = 11,		 // any other errno
	E_BUSY = 12,		 // too many streams
	E_BAD_USER = 13,	 // the user or group does not exist
	E_EXEC_FAILED = 14,	 // exec failed for another reason (ENOEXEC, ...)
};

enum file_type {
	FT_FILE = 1,
	FT_DIR = 2,
	FT_SYMLINK = 3,
	FT_CHAR = 4,
	FT_BLOCK = 5,
	FT_FIFO = 6,
	FT_SOCKET = 7,
};

#endif
