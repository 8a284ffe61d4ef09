/* pvprobe-user.S: the probe's user-mode code, included by pvprobe-guest.S at G_UCODE.
   Every event whose frame RIP lies in this page is treated as coming from user mode. */

/* One user-mode test: a marker record, the instruction(s), then rax afterwards. A fault
   resumes at the label after the instructions (V_RESUME). */
#define UT(name, ...) UT_A name ; __VA_ARGS__ ; UT_B
.macro UT_A name
	REC "u.\name", 0
	lea rax, [rip + 8f]
	mov [V_RESUME], rax
.endm
.macro UT_B
8:	mov qword ptr [V_RESUME], 0
	REC "  u.rax_after", rax
.endm

u_tests:
	UT(syscall_noop, xor eax, eax; syscall)
	UT(int3, int3)
	UT(int3_long_form, .byte 0xcd, 0x03)
	UT(ud2, ud2)
	UT(out_port, out 0x80, al)
	/* variant 1 only: a present supervisor-only page livelocks the host's shadow MMU */
	cmp qword ptr [V_VARIANT], 1
	jne 1f
	UT(read_supervisor_page, mov rax, [G_SONLY])
	UT(write_supervisor_page, mov qword ptr [G_SONLY + 8], 1)
1:
	UT(read_not_present, mov rax, [G_NOTPRES])
	UT(read_kernel_only_page, mov rax, [G_KONLY])
	UT(int80, int 0x80)
	UT(int30_dpl0_gate, int 0x30)
	UT(cpuid_1a, mov eax, 0x40000000; xor ecx, ecx; int 0x1a; mov eax, ebx)
	UT(hc_flush_tlb, mov eax, 0x1007; int 0x1b)
	UT(hc_set_cr3_kernel_then_read_kernel_only, mov ebx, G_KPML4; mov eax, 0x1001; int 0x1b; mov rax, [G_KONLY])
	UT(mov_cr3_kernel_then_read_kernel_only, mov eax, G_KPML4; mov cr3, rax; mov rax, [G_KONLY])
	UT(hc_halt, mov eax, 0x1009; int 0x1b)
	UT(hc_load_idt, mov ebx, G_IDT; mov ecx, 0xfff; mov eax, 0x1005; int 0x1b)
	UT(hc_unknown, mov eax, 0x1fff; int 0x1b)
	UT(hc_iret_frame_to_kernel_cs, lea rax, [rip + 1f]; mov [V_FRAME + 24], rax; mov qword ptr [V_FRAME + 32], 0x10; mov qword ptr [V_FRAME + 40], 2; mov [V_FRAME + 48], rsp; mov qword ptr [V_FRAME + 56], 0x18; mov qword ptr [V_FRAME], 0x4141; mov ebx, V_FRAME; mov eax, 0x100d; int 0x1b; 1: out P_KCHECK, al)
	UT(iretq_to_kernel_cs, mov rax, rsp; push 0x18; push rax; push 2; push 0x10; lea rax, [rip + 1f]; push rax; iretq; 1: out P_KCHECK, al)
	UT(sysretq_in_user, lea rcx, [rip + 8f]; mov r11d, 0x202; sysretq)
	UT(swapgs_in_user, swapgs)
	UT(rdmsr_signature, mov ecx, 0x4b564d11; rdmsr)
	UT(wrmsr_lstar, mov ecx, 0xc0000082; xor eax, eax; xor edx, edx; wrmsr)
	UT(cli_then_vif, cli; movzx eax, byte ptr [G_VIF])
	UT(popf_if0_then_vif, pushfq; and qword ptr [rsp], ~0x200; popfq; movzx eax, byte ptr [G_VIF])
	UT(popf_restore, pushfq; or qword ptr [rsp], 0x200; popfq; movzx eax, byte ptr [G_VIF])
	UT(hlt, hlt)
	UT(lgdt, lgdt [gdtr_desc])
	UT(mov_ss_kernel, mov eax, 0x18; mov ss, ax)
	UT(xsetbv, xor ecx, ecx; xgetbv; xsetbv)
	UT(xgetbv, xor ecx, ecx; xgetbv)
	UT(mov_dr7, xor eax, eax; mov dr7, rax)
	UT(rdtsc, rdtsc)
	UT(read_cr3, mov rax, cr3)
	UT(syscall_record, xor eax, eax; syscall)
	/* protection keys: is the user's PKRU the one the kernel runs with? (variant 2: deny key 0) */
	UT(wrpkru_deny_key1_then_syscall, xor ecx, ecx; xor edx, edx; mov eax, 0xc; wrpkru; mov eax, 12; syscall)
	cmp qword ptr [V_VARIANT], 2
	jne 1f
	UT(wrpkru_deny_key0_then_syscall, xor ecx, ecx; xor edx, edx; mov eax, 0x3; wrpkru; mov eax, 12; syscall)
1:	UT(wrpkru_restore, xor ecx, ecx; xor edx, edx; xor eax, eax; wrpkru; mov eax, 12; syscall)
	/* the user's own GS base (wrgsbase) across kernel events */
	UT(gsbase_syscall, mov rax, 0x111000; wrgsbase rax; mov eax, 1; syscall; rdgsbase rax)
	UT(gsbase_syscall_vmm_exit, mov rax, 0x222000; wrgsbase rax; mov eax, 4; syscall; rdgsbase rax)
	UT(gsbase_syscall_swapgs_vmm_exit, mov rax, 0x333000; wrgsbase rax; mov eax, 13; syscall; rdgsbase rax)
	UT(gsbase_page_fault, mov rax, 0x444000; wrgsbase rax; lea rbx, [rip + 1f]; mov [V_RESUME], rbx; mov rbx, [G_NOTPRES]; 1: rdgsbase rax)
	UT(gsbase_syscall_swapgs_halt, mov rax, 0x555000; wrgsbase rax; mov eax, 14; syscall; rdgsbase rax)
	UT(gsbase_syscall_halt, mov rax, 0x666000; wrgsbase rax; mov eax, 15; syscall; rdgsbase rax)
	UT(gsbase_timer_irq, mov rax, 0x777000; wrgsbase rax; mov eax, 6; mov ebx, 5; syscall; mov rcx, 200000000; 2: dec rcx; jnz 2b; rdgsbase rax)
	UT(gs_model_a, mov rax, 0xa00000; wrgsbase rax; mov eax, 16; syscall; rdgsbase rax)
	UT(gs_model_b, mov rax, 0xb00000; wrgsbase rax; mov eax, 16; syscall; rdgsbase rax)
	UT(gs_model_b_again, mov eax, 16; syscall; rdgsbase rax)
	UT(gs_model_c_twice, mov rax, 0xc00000; wrgsbase rax; mov eax, 16; syscall; mov rax, 0xc00000; wrgsbase rax; mov eax, 16; syscall; rdgsbase rax)
	UT(gs_model_d_msr_write_in_kernel, mov rax, 0xd00000; wrgsbase rax; mov eax, 16; syscall; rdgsbase rax)
	/* GS base in user mode = G, KERNEL_GS_BASE = K beforehand (set via a syscall round trip pair) */
	UT(gs_sysretq_noswap, mov rax, 0x1000; wrgsbase rax; mov eax, 16; syscall; rdgsbase rax)
	UT(gs_sysretq_noswap_2, mov rax, 0x2000; wrgsbase rax; mov eax, 1; syscall; rdgsbase rax)
	UT(gs_100d_noswap, mov rax, 0x3000; wrgsbase rax; mov eax, 10; syscall; rdgsbase rax)
	UT(gs_100d_noswap_2, mov rax, 0x4000; wrgsbase rax; mov eax, 10; syscall; rdgsbase rax)
	UT(gs_swapgs2_100d, mov rax, 0x5000; wrgsbase rax; mov eax, 17; syscall; rdgsbase rax)
	UT(gs_swapgs2_100d_2, mov rax, 0x6000; wrgsbase rax; mov eax, 17; syscall; rdgsbase rax)
	UT(gs_swapgs2_sysretq, mov rax, 0x7000; wrgsbase rax; mov eax, 18; syscall; rdgsbase rax)
	UT(gs_swapgs2_sysretq_2, mov rax, 0x8000; wrgsbase rax; mov eax, 18; syscall; rdgsbase rax)
	UT(gs_ud2_100d, mov qword ptr [V_URET], RET_HC100D; mov qword ptr [V_QUIETEV], 1; mov rax, 0x9000; wrgsbase rax; lea rbx, [rip + 1f]; mov [V_RESUME], rbx; ud2; 1: rdgsbase rax)
	UT(gs_ud2_100d_2, mov rax, 0xa000; wrgsbase rax; lea rbx, [rip + 1f]; mov [V_RESUME], rbx; ud2; 1: rdgsbase rax)
	UT(gs_ud2_sysretq, mov qword ptr [V_URET], RET_SYSRET; mov rax, 0xb000; wrgsbase rax; lea rbx, [rip + 1f]; mov [V_RESUME], rbx; ud2; 1: rdgsbase rax)
	UT(gs_ud2_sysretq_2, mov rax, 0xc000; wrgsbase rax; lea rbx, [rip + 1f]; mov [V_RESUME], rbx; ud2; 1: rdgsbase rax)
	mov qword ptr [V_QUIETEV], 0
	mov qword ptr [V_URET], RET_HC100D
	UT(gs_linux_model_1, mov rax, 0xe1000; wrgsbase rax; mov eax, 19; syscall; rdgsbase rax)
	UT(gs_linux_model_2, mov rax, 0xe2000; wrgsbase rax; mov eax, 19; syscall; rdgsbase rax)
	UT(gs_linux_model_3, mov eax, 19; syscall; rdgsbase rax)
	UT(wrmsr_vif_zero, mov ecx, 0x4b564d10; xor eax, eax; xor edx, edx; wrmsr)
	UT(syscall_after_wrmsr_vif, xor eax, eax; syscall)
	mov eax, 2
	syscall
	jmp .

/* experiment ret: what user mode finds after a return */
u_dumpregs:
	mov [V_SAVE], rax
	mov [V_SAVE + 8], rbx
	mov [V_SAVE + 16], rcx
	mov [V_SAVE + 24], rdx
	mov [V_SAVE + 32], rsi
	mov [V_SAVE + 40], rdi
	mov [V_SAVE + 48], rbp
	mov [V_SAVE + 56], r8
	mov [V_SAVE + 64], r9
	mov [V_SAVE + 72], r10
	mov [V_SAVE + 80], r11
	mov [V_SAVE + 88], rsp
	pushfq
	pop rax
	mov [V_SAVE + 96], rax
	mov rax, [V_SAVE]
	REC "  u.rax", rax
	mov rax, [V_SAVE + 8]
	REC "  u.rbx", rax
	mov rax, [V_SAVE + 16]
	REC "  u.rcx", rax
	mov rax, [V_SAVE + 24]
	REC "  u.rdx", rax
	mov rax, [V_SAVE + 32]
	REC "  u.rsi", rax
	mov rax, [V_SAVE + 40]
	REC "  u.rdi", rax
	mov rax, [V_SAVE + 48]
	REC "  u.rbp", rax
	mov rax, [V_SAVE + 56]
	REC "  u.r8", rax
	mov rax, [V_SAVE + 80]
	REC "  u.r11", rax
	mov rax, [V_SAVE + 88]
	REC "  u.rsp", rax
	mov rax, [V_SAVE + 96]
	REC "  u.rflags", rax
	movzx eax, byte ptr [G_VIF]
	REC "  u.vif.if", rax
	mov eax, 5
	syscall
	jmp .

u_vifcheck:
	movzx eax, byte ptr [G_VIF]
	REC "  u.vif.if", rax
	pushfq
	pop rax
	REC "  u.rflags", rax
	mov eax, 5
	syscall
	jmp .

u_modecheck:
	mov ax, cs
	movzx eax, ax
	REC "  u.cs_as_read", rax
	mov ax, ss
	movzx eax, ax
	REC "  u.ss_as_read", rax
	pushfq
	pop rax
	REC "  u.rflags", rax
	lea rax, [rip + 1f]
	mov [V_RESUME], rax
	out P_KCHECK, al
	REC "  u.OUT_SUCCEEDED_IN_KERNEL_MODE!", 1
1:	mov rax, [V_FAULTVEC]
	REC "  u.out_fault_vector", rax
	mov qword ptr [V_RESUME], 0
	mov eax, 5
	syscall
	jmp .

u_pend:
	.rept 16
	nop
	.endr
	mov rax, [V_IRQN]
	REC "  u.irq.count", rax
	mov rax, [V_IRQSEEN]
	REC "  u.irq.frame.rip", rax
	mov rax, [V_IRQCS]
	REC "  u.irq.frame.cs", rax
	mov rax, [V_IRQIF]
	REC "  u.irq.vif.if_at_entry", rax
	movzx eax, byte ptr [G_VIF]
	REC "  u.vif.if", rax
	mov eax, 5
	syscall
	jmp .

/* experiment perm: events from user mode with rax = the kernel table, which the stubs load
   into CR3 before anything touches the stack */
u_perm:
	REC "u.perm.ud2", 0
	lea rax, [rip + 1f]
	mov [V_RESUME], rax
	mov eax, G_KPML4
	ud2
1:	REC "u.perm.int3", 0
	mov eax, G_KPML4
	int3
	REC "u.perm.page_fault", 0
	lea rax, [rip + 1f]
	mov [V_RESUME], rax
	mov eax, G_KPML4
	mov rbx, [G_NOTPRES]
1:	REC "u.perm.interrupt", 0
	mov qword ptr [V_IRQN], 0
	mov eax, 6
	mov ebx, 20
	syscall
	mov eax, G_KPML4
	mov rcx, 1500000000
1:	dec rcx
	jz 2f
	cmp qword ptr [V_IRQN], 0
	je 1b
2:	mov rbx, [V_IRQN]
	REC "  u.irq.count", rbx
	mov eax, 2
	syscall
	jmp .

/* experiment cost: timed round trips from user mode (cycles per iteration) */
#define UCOST(name, ...) UCOST_A ; __VA_ARGS__ ; UCOST_B name
.macro UCOST_A
	RDTSC64 r12
	mov r13, [V_LOOPS]
7:
.endm
.macro UCOST_B name
	dec r13
	jnz 7b
	RDTSC64 rax
	sub rax, r12
	xor edx, edx
	div qword ptr [V_LOOPS]
	REC "cost.\name\().cyc", rax
.endm
u_cost:
	UCOST(user_rdtsc, rdtsc)
	UCOST(syscall_sysretq, mov eax, 1; syscall)
	UCOST(syscall_2x_mov_cr3_sysretq, mov eax, 7; syscall)
	UCOST(syscall_2x_hc_set_cr3_sysretq, mov eax, 8; syscall)
	UCOST(syscall_2x_swapgs_sysretq, mov eax, 9; syscall)
	UCOST(syscall_mov_from_cr3_sysretq, mov eax, 11; syscall)
	UCOST(syscall_return_by_100d, mov eax, 10; syscall)
	mov qword ptr [V_URET], RET_HC100D
	UCOST(ud2_return_by_100d, lea rax, [rip + 1f]; mov [V_RESUME], rax; ud2; 1:)
	mov qword ptr [V_URET], RET_SYSRET
	UCOST(ud2_return_by_sysretq, lea rax, [rip + 1f]; mov [V_RESUME], rax; ud2; 1:)
	mov qword ptr [V_URET], RET_HC100D
	UCOST(page_fault_return_by_100d, lea rax, [rip + 1f]; mov [V_RESUME], rax; mov rax, [G_NOTPRES]; 1:)
	UCOST(int3_return_by_100d, int3)
	mov eax, 2
	syscall
	jmp .

/* experiment hostile: user mode after the kernel left garbage in the VIF page */
u_hostile:
	REC "u.hostile.alive", 1
	xor eax, eax
	syscall
	int3
	REC "u.hostile.after_int3", 1
	mov eax, 2
	syscall
	jmp .

u_vif_garbage:
	REC "u.vif_garbage.start", 1
	mov rdi, G_VIF
	mov ecx, 4096
	mov al, 0xff
	rep stosb
	mov rcx, 100000000
1:	dec rcx
	jnz 1b
	REC "u.vif_garbage.after_spin", 1
	xor eax, eax
	syscall
	int3
	REC "u.vif_garbage.after_int3", 1
	mov eax, 2
	syscall
	jmp .
